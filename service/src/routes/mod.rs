//! The handlers, one module per resource: each parses its request into typed values, calls
//! the library (`warren-dispatcher`) and answers with its JSON or a [`crate::problem::Problem`].

pub mod dead;
pub mod jobs;
pub mod queues;
pub mod wait;
