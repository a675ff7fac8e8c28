//! The OpenAPI 3.1 document served at `/openapi.json`, generated from the handlers'
//! `#[utoipa::path]` attributes and the request and response types (`utoipa`): nothing in it is
//! written by hand, so it cannot drift from the routes.

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::problem::ProblemBody;
use crate::routes::{dead, jobs, queues, wait};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Warren",
        description = "Submit jobs to Warren's queues on RabbitMQ, see the queues, work their \
                       dead letters and wait for outcomes. Every /v1 route takes \
                       `Authorization: Bearer <token>`; scopes: read (GET) ⊂ submit (POST jobs) \
                       ⊂ admin (dead:replay, dead:purge)."
    ),
    paths(
        jobs::submit,
        jobs::batch,
        queues::list,
        dead::list,
        dead::show,
        dead::replay,
        dead::purge,
        wait::wait,
    ),
    components(schemas(
        ProblemBody,
        jobs::JobRequest,
        jobs::Delay,
        jobs::Accepted,
        jobs::BatchResult,
        jobs::ItemResult,
        dead::DeadList,
        dead::ReplayRequest,
        dead::PurgeRequest,
        wait::Pending,
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

/// Declares the `bearer` security scheme the paths refer to.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The document as JSON text.
pub fn document() -> String {
    // Serialising the generated document (plain data) cannot fail; an empty object would
    // still be JSON.
    ApiDoc::openapi()
        .to_json()
        .unwrap_or_else(|_| "{}".to_owned())
}
