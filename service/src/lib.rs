//! # warren-service
//!
//! Warren's HTTP API (`warren serve`).
