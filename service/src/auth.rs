//! Who may call the API: bearer tokens from `[[http.tokens]]` (and `$WARREN_HTTP_TOKEN`),
//! each with a scope, `read` ⊂ `submit` ⊂ `admin`, and a per-token rate limit.
//!
//! 1. [`authenticate`] (a middleware on every `/v1` route) reads `Authorization: Bearer
//!    <token>` and compares it with every configured token in constant time (`subtle`), so
//!    the answer's timing does not tell how much of a guess was right; no match → 401 with
//!    `WWW-Authenticate: Bearer`.
//! 2. The token's bucket (`governor`, `http.rate_limit` per second, `http.rate_burst` deep)
//!    takes one request, or the answer is 429 with `Retry-After`.
//! 3. [`require`] (a middleware per group of routes) checks the scope: 403 when it is not
//!    enough.
//!
//! The [`Caller`] (the token's *name* and scope, never the token) is put on the request and
//! the response, for the handlers and the access log.

use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use subtle::ConstantTimeEq;
use warren_core::config::{HttpConfig, HttpScope};

use crate::problem::Problem;

/// The configured tokens, each with its rate limiter.
pub struct Tokens {
    tokens: Vec<Token>,
}

struct Token {
    secret: Vec<u8>,
    caller: Caller,
    limiter: Option<DefaultDirectRateLimiter>,
}

/// Who made a request: the token's name (`token-N` when the config names none) and scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: Arc<str>,
    pub scope: HttpScope,
}

impl Tokens {
    /// The tokens of `[http]`, each with a limiter when `rate_limit` is set.
    pub fn new(http: &HttpConfig) -> Tokens {
        let quota = NonZeroU32::new(http.rate_limit).map(|per_second| {
            let burst = NonZeroU32::new(http.rate_burst).unwrap_or(per_second);
            Quota::per_second(per_second).allow_burst(burst)
        });
        let tokens = http
            .tokens
            .iter()
            .enumerate()
            .map(|(i, token)| Token {
                secret: token.token.as_bytes().to_vec(),
                caller: Caller {
                    name: token
                        .name
                        .clone()
                        .unwrap_or_else(|| format!("token-{i}"))
                        .into(),
                    scope: token.scope,
                },
                limiter: quota.map(RateLimiter::direct),
            })
            .collect();
        Tokens { tokens }
    }

    /// How many tokens there are (none: every request is refused).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The token `presented` is, compared with every token in constant time.
    fn find(&self, presented: &[u8]) -> Option<&Token> {
        let mut found = None;
        for token in &self.tokens {
            // `ct_eq` on slices of different lengths is false without looking at the bytes;
            // every token is compared, whichever matches.
            if bool::from(token.secret.as_slice().ct_eq(presented)) && found.is_none() {
                found = Some(token);
            }
        }
        found
    }

    /// Step 1 and 2: the caller, or 401 / 429.
    fn check(&self, request: &Request) -> Result<Caller, Problem> {
        let Some(value) = request.headers().get(header::AUTHORIZATION) else {
            return Err(Problem::unauthorized(
                "no token: send `Authorization: Bearer <token>`",
            ));
        };
        let presented = value
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .or_else(|| value.as_bytes().strip_prefix(b"bearer "))
            .map(<[u8]>::trim_ascii)
            .ok_or_else(|| {
                Problem::unauthorized("the Authorization header must be `Bearer <token>`")
            })?;
        let token = self
            .find(presented)
            .ok_or_else(|| Problem::unauthorized("invalid token"))?;
        if let Some(limiter) = &token.limiter
            && let Err(not_until) = limiter.check()
        {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let mut problem = Problem::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "too many requests for token `{}` (http.rate_limit); try again in {:.1} s",
                    token.caller.name,
                    wait.as_secs_f64()
                ),
            );
            problem.retry_after = Some(wait.as_secs_f64().ceil() as u64);
            return Err(problem);
        }
        Ok(token.caller.clone())
    }
}

/// Middleware: authenticates and rate-limits (steps 1 and 2 of the [module docs](self)).
pub async fn authenticate(
    State(tokens): State<Arc<Tokens>>,
    mut request: Request,
    next: Next,
) -> Response {
    match tokens.check(&request) {
        Ok(caller) => {
            request.extensions_mut().insert(caller.clone());
            let mut response = next.run(request).await;
            response.extensions_mut().insert(caller);
            response
        }
        Err(problem) => problem.into_response(),
    }
}

/// Middleware: 403 unless the caller's scope includes `needed` (step 3).
pub async fn require(State(needed): State<HttpScope>, request: Request, next: Next) -> Response {
    let scope = request.extensions().get::<Caller>().map(|c| c.scope);
    match scope {
        Some(scope) if scope >= needed => next.run(request).await,
        Some(scope) => Problem::new(
            axum::http::StatusCode::FORBIDDEN,
            format!(
                "this token's scope is `{}`; this operation needs `{}`",
                scope.as_str(),
                needed.as_str()
            ),
        )
        .into_response(),
        // `authenticate` runs first; without it, nobody is let in.
        None => Problem::unauthorized("no token").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_core::config::HttpToken;

    fn tokens(rate_limit: u32) -> Tokens {
        Tokens::new(&HttpConfig {
            tokens: vec![
                HttpToken {
                    name: Some("reader".into()),
                    token: "read-token-0123456789".into(),
                    scope: HttpScope::Read,
                },
                HttpToken {
                    name: None,
                    token: "admin-token-0123456789".into(),
                    scope: HttpScope::Admin,
                },
            ],
            rate_limit,
            ..HttpConfig::default()
        })
    }

    fn request(authorization: Option<&str>) -> Request {
        let mut builder = Request::builder().uri("/v1/queues");
        if let Some(value) = authorization {
            builder = builder.header(header::AUTHORIZATION, value);
        }
        builder.body(axum::body::Body::empty()).expect("a request")
    }

    #[test]
    fn tokens_are_found_by_their_secret_only() {
        let tokens = tokens(0);
        let caller = tokens
            .check(&request(Some("Bearer admin-token-0123456789")))
            .expect("known");
        assert_eq!(&*caller.name, "token-1");
        assert_eq!(caller.scope, HttpScope::Admin);
        for wrong in [
            None,
            Some("Bearer admin-token-012345678"),
            Some("Bearer admin-token-01234567890"),
            Some("Basic admin-token-0123456789"),
            Some("Bearer "),
        ] {
            let problem = tokens.check(&request(wrong)).expect_err("refused");
            assert_eq!(problem.status, axum::http::StatusCode::UNAUTHORIZED);
            assert!(problem.challenge);
        }
    }

    #[test]
    fn the_rate_limit_answers_429_with_retry_after() {
        let tokens = tokens(1);
        let read = || tokens.check(&request(Some("Bearer read-token-0123456789")));
        read().expect("the first request passes");
        let problem = read().expect_err("the second is too many");
        assert_eq!(problem.status, axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert!(problem.retry_after.is_some_and(|s| s >= 1));
        // Another token has its own bucket.
        tokens
            .check(&request(Some("Bearer admin-token-0123456789")))
            .expect("its own bucket");
    }
}
