//! The HTTP API (`warren serve`), end to end: a real `warren serve` process on a free port
//! ([`warren_tests::http::Serve`]) in front of the test broker, with in-process workers.
//!
//! Covered: every status code the API answers with (401 with `WWW-Authenticate`, 403, 413,
//! 415, 400 naming the field, 404, 405 with `Allow`, 429 with `Retry-After`, 503 with
//! `Retry-After`, 202/207/200), authentication on every route, the headers on every response,
//! the access log (no token in it), jobs submitted over HTTP and run by a worker, batches,
//! the dead-letter workbench, waiting for outcomes, graceful shutdown, the OpenAPI document
//! (every documented route answers as documented) and the TLS listener.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use warren_tests::http::{Serve, Token, client, serve_config};
use warren_tests::{Recorder, cleanup, config, connect, dispatcher, start_worker, unique_queue};
use warren_workers::{JobError, Registry};

const READ: &str = "read-token-0123456789abcdef";
const SUBMIT: &str = "submit-token-0123456789abcdef";
const ADMIN: &str = "admin-token-0123456789abcdef";
const TOKENS: [Token<'static>; 3] = [
    ("reader", READ, "read"),
    ("submitter", SUBMIT, "submit"),
    ("operator", ADMIN, "admin"),
];

/// Every route: method, path (with `{queue}` and `{id}` to fill in), the scope it needs, and
/// a JSON body when it takes one.
const ROUTES: [(&str, &str, &str, Option<&str>); 8] = [
    ("POST", "/v1/queues/{queue}/jobs", "submit", Some("{}")),
    (
        "POST",
        "/v1/queues/{queue}/jobs:batch",
        "submit",
        Some("[]"),
    ),
    ("GET", "/v1/queues", "read", None),
    ("GET", "/v1/queues/{queue}/dead", "read", None),
    ("GET", "/v1/queues/{queue}/dead/{id}", "read", None),
    (
        "POST",
        "/v1/queues/{queue}/dead:replay",
        "admin",
        Some("{}"),
    ),
    ("POST", "/v1/queues/{queue}/dead:purge", "admin", Some("{}")),
    ("GET", "/v1/jobs/{id}/wait", "read", None),
];

fn fill(path: &str, queue: &str) -> String {
    path.replace("{queue}", queue)
        .replace("{id}", "no-such-job")
}

/// A request with an optional token and JSON body.
async fn call(
    http: &reqwest::Client,
    serve: &Serve,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> reqwest::Response {
    let method = Method::from_bytes(method.as_bytes()).expect("a method");
    let mut request = http.request(method, serve.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    request.send().await.expect("the server answers")
}

fn assert_safe_headers(response: &reqwest::Response, what: &str) {
    let headers = response.headers();
    assert_eq!(
        headers.get("cache-control").and_then(|v| v.to_str().ok()),
        Some("no-store"),
        "{what}: Cache-Control"
    );
    assert_eq!(
        headers
            .get("x-content-type-options")
            .and_then(|v| v.to_str().ok()),
        Some("nosniff"),
        "{what}: X-Content-Type-Options"
    );
}

async fn json_of(response: reqwest::Response) -> Value {
    response.json().await.expect("a JSON body")
}

/// Given a server with a read, a submit and an admin token,
/// when every route is called without a token, with a wrong one, and with each scope,
/// then it answers 401 (with `WWW-Authenticate: Bearer`) / 403 as the scopes say, every
/// response carries the two safety headers, and the access log names tokens but never
/// shows one.
#[tokio::test]
async fn every_route_needs_a_token_with_enough_scope() {
    let queue = unique_queue("http-auth");
    let serve = Serve::builder(&serve_config(&[&queue], &TOKENS, "", ""))
        .start()
        .await;
    let http = client(None);
    let rank = |scope: &str| ["read", "submit", "admin"].iter().position(|s| *s == scope);
    for (method, path, needs, body) in ROUTES {
        let path = fill(path, &queue);
        let what = format!("{method} {path}");
        for token in [None, Some("wrong-token-0123456789abcdef"), Some("")] {
            let response = call(&http, &serve, method, &path, token, body).await;
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{what} {token:?}"
            );
            assert_safe_headers(&response, &what);
            let challenge = response
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            assert!(challenge.starts_with("Bearer"), "{what}: {challenge}");
            assert!(json_of(response).await["error"].is_string());
        }
        for (_, token, scope) in TOKENS {
            let response = call(&http, &serve, method, &path, Some(token), body).await;
            assert_safe_headers(&response, &what);
            let status = response.status();
            if rank(scope) < rank(needs) {
                assert_eq!(status, StatusCode::FORBIDDEN, "{what} with scope {scope}");
            } else {
                assert!(
                    ![StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN].contains(&status),
                    "{what} with scope {scope}: {status}"
                );
                assert!(!status.is_server_error(), "{what}: {status}");
            }
        }
    }
    let log = serve.stderr();
    assert!(log.contains("token=\"operator\""), "access log: {log}");
    assert!(log.contains("status=401"), "access log: {log}");
    for (_, token, _) in TOKENS {
        assert!(!log.contains(token), "a token in the log: {log}");
    }
}

/// Given a server with small limits,
/// when clients make each mistake a client can make,
/// then each gets its 4xx (never a 5xx), with a JSON error that names the field at fault.
#[tokio::test]
async fn client_mistakes_get_4xx_naming_the_field() {
    let queue = unique_queue("http-mistakes");
    let config_text = serve_config(
        &[&queue],
        &TOKENS,
        "body_limit = 4096",
        "[jobs]\nmax_payload_bytes = 2048\n",
    );
    let serve = Serve::builder(&config_text).start().await;
    let http = client(None);
    let jobs = format!("/v1/queues/{queue}/jobs");
    let post = |path: String, body: &'static str| {
        let http = http.clone();
        let url = serve.url(&path);
        async move {
            http.post(url)
                .bearer_auth(ADMIN)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("an answer")
        }
    };
    for (body, field) in [
        (r#"{"payload": {}}"#, Some("kind")),
        (r#"{"kind": "echo"}"#, Some("payload")),
        (r#"{"kind": 5, "payload": {}}"#, Some("kind")),
        (
            r#"{"kind": "echo", "payload": {}, "priority": 256}"#,
            Some("priority"),
        ),
        (
            r#"{"kind": "echo", "payload": {}, "priority": "high"}"#,
            Some("priority"),
        ),
        (
            r#"{"kind": "echo", "payload": {}, "delay": "soon"}"#,
            Some("delay"),
        ),
        (
            r#"{"kind": "echo", "payload": {}, "delay": -5}"#,
            Some("delay"),
        ),
        (
            r#"{"kind": "echo", "payload": {}, "colour": "red"}"#,
            Some("colour"),
        ),
        (r#"{"kind": "", "payload": {}}"#, Some("kind")),
        (r#"{"kind": "echo", "payload": {}"#, None),
        ("not json", None),
    ] {
        let response = post(jobs.clone(), body).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        assert_safe_headers(&response, body);
        let problem = json_of(response).await;
        assert_eq!(problem["field"].as_str(), field, "{body}: {problem}");
        if let Some(field) = field {
            assert!(
                problem["error"].as_str().is_some_and(|e| e.contains(field)),
                "the message names `{field}`: {problem}"
            );
        }
    }
    // A batch names the item.
    let response = post(
        format!("/v1/queues/{queue}/jobs:batch"),
        r#"[{"kind": "a", "payload": 1}, {"payload": 2}]"#,
    )
    .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json_of(response).await["field"], "[1].kind");

    // 415: no content type, or another one.
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut request = http
            .post(serve.url(&jobs))
            .bearer_auth(ADMIN)
            .body(r#"{"kind": "echo", "payload": {}}"#);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.expect("an answer");
        assert_eq!(
            response.status(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
        assert_safe_headers(&response, "415");
    }
    // 413: a body over http.body_limit, and a payload over jobs.max_payload_bytes.
    let big = format!(r#"{{"kind": "echo", "payload": "{}"}}"#, "x".repeat(8192));
    let response = http
        .post(serve.url(&jobs))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_safe_headers(&response, "413");
    let payload = format!(r#"{{"kind": "echo", "payload": "{}"}}"#, "x".repeat(3000));
    let response = http
        .post(serve.url(&jobs))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body(payload)
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(json_of(response).await["field"], "payload");

    // 404: a queue the config does not list, and a route the API does not have.
    let response = post(
        "/v1/queues/no-such-queue/jobs".into(),
        r#"{"kind": "a", "payload": 1}"#,
    )
    .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(json_of(response).await["field"], "queue");
    for path in ["/v1/queues/no-such-queue/dead", "/v1/nothing", "/"] {
        let response = call(&http, &serve, "GET", path, Some(ADMIN), None).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert_safe_headers(&response, path);
    }
    // 405 with Allow.
    for (method, path, allowed) in [
        ("GET", jobs.clone(), "POST"),
        ("DELETE", "/v1/queues".to_owned(), "GET"),
        ("PUT", format!("/v1/queues/{queue}/dead:purge"), "POST"),
    ] {
        let response = call(&http, &serve, method, &path, Some(ADMIN), None).await;
        assert_eq!(
            response.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert_safe_headers(&response, "405");
        let allow = response
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(allow.contains(allowed), "{method} {path}: Allow {allow}");
    }
    // Query and path parameters name themselves: an invalid value, an unknown parameter (a
    // misspelt `timeout` would otherwise wait 30 s), a path parameter that is not UTF-8.
    for (path, field) in [
        (format!("/v1/queues/{queue}/dead?limit=many"), "limit"),
        ("/v1/jobs/x/wait?timeout=forever".to_owned(), "timeout"),
        ("/v1/jobs/x/wait?timout=1s".to_owned(), "timout"),
        ("/v1/jobs/%FF%FE/wait".to_owned(), "id"),
    ] {
        let response = call(&http, &serve, "GET", &path, Some(READ), None).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(json_of(response).await["field"], field, "{path}");
    }
    // A replay rate too slow to schedule (or not positive) is refused before anything moves.
    for body in [
        r#"{"all": true, "rate": 1e-300}"#,
        r#"{"all": true, "rate": 0}"#,
    ] {
        let response = post(format!("/v1/queues/{queue}/dead:replay"), body).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(json_of(response).await["field"], "rate");
    }
    // A purge needs a filter or "all": true.
    let response = post(format!("/v1/queues/{queue}/dead:purge"), "{}").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json_of(response).await["field"], "all");
}

/// Given `http.rate_limit = 1` with a burst of 2,
/// when one token makes more requests at once than its bucket holds,
/// then it gets 429 with `Retry-After`, and another token is not affected.
#[tokio::test]
async fn too_many_requests_for_a_token_get_429() {
    let queue = unique_queue("http-rate");
    let config_text = serve_config(&[&queue], &TOKENS, "rate_limit = 1\nrate_burst = 2", "");
    let serve = Serve::builder(&config_text).start().await;
    let http = client(None);
    let mut limited = None;
    for _ in 0..10 {
        let response = call(
            &http,
            &serve,
            "GET",
            "/v1/jobs/x/wait?timeout=0s",
            Some(READ),
            None,
        )
        .await;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(response);
            break;
        }
    }
    let response = limited.expect("a 429 within 10 quick requests of a 1/s, burst 2 token");
    assert_safe_headers(&response, "429");
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!(retry_after >= 1);
    let other = call(
        &http,
        &serve,
        "GET",
        "/v1/jobs/x/wait?timeout=0s",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(
        other.status(),
        StatusCode::NOT_FOUND,
        "another token has its own bucket"
    );
}

/// Given a worker for a queue and a server in front of the broker,
/// when a job is submitted over HTTP and its outcome waited for,
/// then the worker runs it (same id, same payload), and the wait answers 200 done with the
/// handler's result; a failing job's wait answers 200 failed with class and attempts; a job
/// with no outcome yet answers 202 pending; an unknown id 404.
#[tokio::test]
async fn jobs_submitted_over_http_run_and_their_outcomes_are_waited_for() {
    let queue = unique_queue("http-jobs");
    // A queue with no worker, for a job whose outcome cannot come.
    let idle = unique_queue("http-idle");
    let config = config(&[&queue, &idle]);
    let d = dispatcher(&config).await;
    d.close().await;
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "echo", |call| {
        Ok(Some(json!({ "echoed": call.payload.clone() })))
    });
    recorder.handle(&mut registry, "fail", |_| {
        Err(JobError::permanent("no good"))
    });
    let worker = start_worker(&config, registry, &[&queue]);
    let serve = Serve::builder(&serve_config(&[&queue, &idle], &TOKENS, "", ""))
        .start()
        .await;
    let http = client(None);
    let jobs = format!("/v1/queues/{queue}/jobs");

    let response = call(
        &http,
        &serve,
        "POST",
        &jobs,
        Some(SUBMIT),
        Some(r#"{"kind": "echo", "payload": {"n": 7}}"#),
    )
    .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_safe_headers(&response, "202");
    let id = json_of(response).await["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    let outcome = call(
        &http,
        &serve,
        "GET",
        &format!("/v1/jobs/{id}/wait?timeout=30s"),
        Some(READ),
        None,
    )
    .await;
    assert_eq!(outcome.status(), StatusCode::OK);
    let outcome = json_of(outcome).await;
    assert_eq!(outcome["status"], "done", "{outcome}");
    assert_eq!(outcome["id"], id.as_str());
    assert_eq!(outcome["result"], json!({ "echoed": { "n": 7 } }));
    let calls = recorder.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(calls[0].id, id);
    assert_eq!(calls[0].payload, json!({ "n": 7 }));
    // Asked again: the same outcome.
    let again = call(
        &http,
        &serve,
        "GET",
        &format!("/v1/jobs/{id}/wait?timeout=0s"),
        Some(READ),
        None,
    )
    .await;
    assert_eq!(again.status(), StatusCode::OK);

    // A delay in seconds or as text: accepted (the job waits in the delay levels).
    for delay in ["1", "\"1s\""] {
        let body = format!(r#"{{"kind": "echo", "payload": {{"d": {delay}}}, "delay": {delay}}}"#);
        let response = call(&http, &serve, "POST", &jobs, Some(SUBMIT), Some(&body)).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED, "delay {delay}");
        let id = json_of(response).await["id"]
            .as_str()
            .expect("an id")
            .to_owned();
        let outcome = call(
            &http,
            &serve,
            "GET",
            &format!("/v1/jobs/{id}/wait?timeout=30s"),
            Some(READ),
            None,
        )
        .await;
        assert_eq!(json_of(outcome).await["status"], "done", "delay {delay}");
    }

    // A chosen id, a job that fails.
    let response = call(
        &http,
        &serve,
        "POST",
        &jobs,
        Some(ADMIN),
        Some(r#"{"kind": "fail", "payload": null, "id": "http-fail-1"}"#),
    )
    .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(json_of(response).await["id"], "http-fail-1");
    let outcome = call(
        &http,
        &serve,
        "GET",
        "/v1/jobs/http-fail-1/wait?timeout=30",
        Some(READ),
        None,
    )
    .await;
    assert_eq!(outcome.status(), StatusCode::OK);
    let outcome = json_of(outcome).await;
    assert_eq!(outcome["status"], "failed", "{outcome}");
    assert_eq!(outcome["class"], "permanent");
    assert_eq!(outcome["attempts"], 1);
    assert!(
        outcome["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no good"))
    );

    // A job no worker takes has no outcome yet: 202 pending.
    let response = call(
        &http,
        &serve,
        "POST",
        &format!("/v1/queues/{idle}/jobs"),
        Some(SUBMIT),
        Some(r#"{"kind": "echo", "payload": 1}"#),
    )
    .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let delayed = json_of(response).await["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    let pending = call(
        &http,
        &serve,
        "GET",
        &format!("/v1/jobs/{delayed}/wait?timeout=1s"),
        Some(READ),
        None,
    )
    .await;
    assert_eq!(pending.status(), StatusCode::ACCEPTED);
    assert_eq!(json_of(pending).await["state"], "pending");

    // An id this server never submitted.
    let unknown = call(
        &http,
        &serve,
        "GET",
        "/v1/jobs/never-submitted/wait?timeout=1s",
        Some(READ),
        None,
    )
    .await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(json_of(unknown).await["field"], "id");

    // GET /v1/queues: the queue, as `warren status --json` shows it.
    let status = call(&http, &serve, "GET", "/v1/queues", Some(READ), None).await;
    assert_eq!(status.status(), StatusCode::OK);
    let status = json_of(status).await;
    assert_eq!(status["amqp"]["reachable"], true, "{status}");
    let row = status["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|row| row["queue"] == queue.as_str())
        .expect("the queue's row")
        .clone();
    assert_eq!(row["exists"], true, "{status}");
    assert!(row["ready"].is_u64() && row["dead"].is_u64(), "{row}");

    worker.stop().await;
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("a channel");
    cleanup(&channel, &[&queue, &idle]).await;
}

/// Given a worker for a queue,
/// when a batch of jobs is posted,
/// then every item is confirmed (202, one id per item, in order) and run; a batch with an item
/// the queue cannot take (a priority on a queue without priorities) answers 207 with that
/// item's 400 naming `priority`, the others accepted.
/// A queue the broker has is served like `warren submit --queue` serves it, whether or not the
/// server's config lists it (its settings are then `[queue_defaults]`); a queue neither lists
/// nor has is a 404 naming `queue`, and nothing is published.
#[tokio::test]
async fn a_queue_the_broker_has_is_served_even_if_the_config_does_not_list_it() {
    let listed = unique_queue("http-listed");
    let unlisted = unique_queue("http-unlisted");
    let nowhere = unique_queue("http-nowhere");
    // Declares both queues (and their dead-letter queues) on the broker.
    let d = dispatcher(&config(&[&listed, &unlisted])).await;
    d.close().await;
    let serve = Serve::builder(&serve_config(&[&listed], &TOKENS, "", ""))
        .start()
        .await;
    let http = client(None);
    let job = r#"{"kind": "echo", "payload": {"n": 1}}"#;

    let response = call(
        &http,
        &serve,
        "POST",
        &format!("/v1/queues/{unlisted}/jobs"),
        Some(SUBMIT),
        Some(job),
    )
    .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let id = json_of(response).await["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let got = warren_tests::take_messages(&channel, &unlisted, 1, Duration::from_secs(10)).await;
    assert_eq!(
        got[0].properties.message_id().as_ref().map(|s| s.as_str()),
        Some(id.as_str())
    );
    let response = call(
        &http,
        &serve,
        "GET",
        &format!("/v1/queues/{unlisted}/dead"),
        Some(READ),
        None,
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);

    for (method, path, body) in [
        ("POST", format!("/v1/queues/{nowhere}/jobs"), Some(job)),
        (
            "POST",
            format!("/v1/queues/{nowhere}/jobs:batch"),
            Some("[]"),
        ),
        ("GET", format!("/v1/queues/{nowhere}/dead"), None),
    ] {
        let response = call(&http, &serve, method, &path, Some(ADMIN), body).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{method} {path}");
        assert_eq!(json_of(response).await["field"], "queue", "{method} {path}");
    }
    cleanup(&channel, &[&listed, &unlisted]).await;
}

#[tokio::test]
async fn batches_answer_per_item() {
    let queue = unique_queue("http-batch");
    let config = config(&[&queue]);
    dispatcher(&config).await.close().await;
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "echo", |_| Ok(None));
    let worker = start_worker(&config, registry, &[&queue]);
    let serve = Serve::builder(&serve_config(&[&queue], &TOKENS, "", ""))
        .start()
        .await;
    let http = client(None);
    let batch = format!("/v1/queues/{queue}/jobs:batch");
    let body = json!([
        { "kind": "echo", "payload": { "n": 1 } },
        { "kind": "echo", "payload": { "n": 2 }, "id": "batch-two" },
        { "kind": "echo", "payload": { "n": 3 } },
    ])
    .to_string();
    let response = call(&http, &serve, "POST", &batch, Some(SUBMIT), Some(&body)).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let result = json_of(response).await;
    assert_eq!(result["accepted"], 3, "{result}");
    assert_eq!(result["failed"], 0);
    let ids: Vec<String> = result["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            assert_eq!(r["status"], 202);
            r["id"].as_str().expect("an id").to_owned()
        })
        .collect();
    assert_eq!(ids[1], "batch-two");
    let calls = recorder.wait_for(3, Duration::from_secs(30)).await;
    let mut ran: Vec<String> = calls.iter().map(|c| c.id.clone()).collect();
    let mut sent = ids.clone();
    ran.sort();
    sent.sort();
    assert_eq!(ran, sent);

    let body = json!([
        { "kind": "echo", "payload": 4 },
        { "kind": "echo", "payload": 5, "priority": 5 },
    ])
    .to_string();
    let response = call(&http, &serve, "POST", &batch, Some(SUBMIT), Some(&body)).await;
    assert_eq!(response.status(), StatusCode::MULTI_STATUS);
    let result = json_of(response).await;
    assert_eq!(result["accepted"], 1, "{result}");
    assert_eq!(result["failed"], 1);
    assert_eq!(result["results"][0]["status"], 202);
    assert_eq!(result["results"][1]["status"], 400);
    assert_eq!(result["results"][1]["field"], "priority");
    recorder.wait_for(4, Duration::from_secs(30)).await;

    worker.stop().await;
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("a channel");
    cleanup(&channel, &[&queue]).await;
}

/// Given three dead letters (a worker failing them permanently),
/// when they are listed, shown, replayed and purged over HTTP,
/// then list and show answer what `warren dlq` shows, replay moves the one asked for back
/// (the worker runs it again), and purge deletes the rest; an unknown id is 404.
#[tokio::test]
async fn dead_letters_are_listed_shown_replayed_and_purged() {
    let queue = unique_queue("http-dlq");
    let config = config(&[&queue]);
    dispatcher(&config).await.close().await;
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "doomed", |_| {
        Err(JobError::permanent("doomed"))
    });
    let worker = start_worker(&config, registry, &[&queue]);
    let serve = Serve::builder(&serve_config(&[&queue], &TOKENS, "", ""))
        .start()
        .await;
    let http = client(None);
    let body = json!([
        { "kind": "doomed", "payload": 1, "id": "dead-1" },
        { "kind": "doomed", "payload": 2, "id": "dead-2" },
        { "kind": "doomed", "payload": 3, "id": "dead-3" },
    ])
    .to_string();
    let response = call(
        &http,
        &serve,
        "POST",
        &format!("/v1/queues/{queue}/jobs:batch"),
        Some(SUBMIT),
        Some(&body),
    )
    .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    for id in ["dead-1", "dead-2", "dead-3"] {
        let outcome = call(
            &http,
            &serve,
            "GET",
            &format!("/v1/jobs/{id}/wait?timeout=30s"),
            Some(READ),
            None,
        )
        .await;
        assert_eq!(json_of(outcome).await["status"], "failed");
    }
    worker.stop().await;

    let dead = format!("/v1/queues/{queue}/dead");
    let list = call(
        &http,
        &serve,
        "GET",
        &format!("{dead}?kind=doomed&class=permanent"),
        Some(READ),
        None,
    )
    .await;
    assert_eq!(list.status(), StatusCode::OK);
    let list = json_of(list).await;
    let mut ids: Vec<&str> = list["dead_letters"]
        .as_array()
        .expect("dead_letters")
        .iter()
        .map(|r| r["id"].as_str().expect("an id"))
        .collect();
    ids.sort();
    assert_eq!(ids, ["dead-1", "dead-2", "dead-3"], "{list}");
    assert_eq!(list["total"], 3);
    let limited = json_of(
        call(
            &http,
            &serve,
            "GET",
            &format!("{dead}?limit=1"),
            Some(READ),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(limited["listed"], 1);
    let none = json_of(
        call(
            &http,
            &serve,
            "GET",
            &format!("{dead}?kind=other"),
            Some(READ),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(none["listed"], 0);

    let show = call(
        &http,
        &serve,
        "GET",
        &format!("{dead}/dead-2"),
        Some(READ),
        None,
    )
    .await;
    assert_eq!(show.status(), StatusCode::OK);
    let show = json_of(show).await;
    assert_eq!(show["id"], "dead-2");
    assert_eq!(show["class"], "permanent");
    assert_eq!(show["payload"], 2);
    let missing = call(
        &http,
        &serve,
        "GET",
        &format!("{dead}/no-such-id"),
        Some(READ),
        None,
    )
    .await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    // Replay dead-2: it is back in the work queue (no worker now) and gone from the dead.
    let replay = call(
        &http,
        &serve,
        "POST",
        &format!("/v1/queues/{queue}/dead:replay"),
        Some(ADMIN),
        Some(r#"{"ids": ["dead-2"]}"#),
    )
    .await;
    assert_eq!(replay.status(), StatusCode::OK);
    let replay = json_of(replay).await;
    assert_eq!(replay["moved"], 1, "{replay}");
    assert_eq!(replay["remaining"], 2);
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("a channel");
    let back = warren_tests::take_messages(&channel, &queue, 1, Duration::from_secs(10)).await;
    assert_eq!(
        back[0].properties.message_id().as_ref().map(|s| s.as_str()),
        Some("dead-2")
    );

    // Purge: scope admin only; then everything left.
    let forbidden = call(
        &http,
        &serve,
        "POST",
        &format!("/v1/queues/{queue}/dead:purge"),
        Some(SUBMIT),
        Some(r#"{"all": true}"#),
    )
    .await;
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    let purge = call(
        &http,
        &serve,
        "POST",
        &format!("/v1/queues/{queue}/dead:purge"),
        Some(ADMIN),
        Some(r#"{"ids": ["dead-1"]}"#),
    )
    .await;
    assert_eq!(purge.status(), StatusCode::OK);
    assert_eq!(json_of(purge).await["deleted"], 1);
    let purge = call(
        &http,
        &serve,
        "POST",
        &format!("/v1/queues/{queue}/dead:purge"),
        Some(ADMIN),
        Some(r#"{"all": true}"#),
    )
    .await;
    let purge = json_of(purge).await;
    assert_eq!(purge["deleted"], 1, "{purge}");
    assert_eq!(purge["remaining"], 0);
    let after = json_of(call(&http, &serve, "GET", &dead, Some(READ), None).await).await;
    assert_eq!(after["total"], 0);

    cleanup(&channel, &[&queue]).await;
}

/// Given a server whose broker address is a closed port (and whose management API too),
/// when a client submits, lists dead letters or asks for the queues,
/// then it gets 503 with `Retry-After`, never a 500, and the error does not leak the URL's
/// password.
#[tokio::test]
async fn an_unreachable_broker_is_503_with_retry_after() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        listener.local_addr().expect("its address").port()
    };
    let config_text = format!(
        "[broker]\nurl = \"amqp://guest:s3cret-pw@127.0.0.1:{port}/%2f\"\nconnect_timeout = \"1s\"\n\
         [management]\nurl = \"http://127.0.0.1:{port}/\"\n[http]\n\
         [[http.tokens]]\ntoken = \"{ADMIN}\"\nscope = \"admin\"\n[queues.q]\n"
    );
    let serve = Serve::builder(&config_text).start().await;
    let http = client(None);
    for (method, path, body) in [
        (
            "POST",
            "/v1/queues/q/jobs",
            Some(r#"{"kind": "a", "payload": 1}"#),
        ),
        ("GET", "/v1/queues", None),
        ("GET", "/v1/queues/q/dead", None),
        ("POST", "/v1/queues/q/dead:purge", Some(r#"{"all": true}"#)),
    ] {
        let response = call(&http, &serve, method, path, Some(ADMIN), body).await;
        assert_eq!(
            response.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "{method} {path}"
        );
        assert_safe_headers(&response, path);
        assert!(
            response.headers().get("retry-after").is_some(),
            "{method} {path}: Retry-After"
        );
        let text = response.text().await.expect("a body");
        assert!(!text.contains("s3cret-pw"), "{text}");
    }
    // A batch: nothing submitted, 503.
    let response = call(
        &http,
        &serve,
        "POST",
        "/v1/queues/q/jobs:batch",
        Some(ADMIN),
        Some(r#"[{"kind": "a", "payload": 1}]"#),
    )
    .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().get("retry-after").is_some());
    assert!(!serve.stderr().contains("s3cret-pw"));
}

/// Given a request in flight (a wait with a 3 s timeout),
/// when the server gets SIGTERM,
/// then that request still gets its answer (202 pending), and the process exits 0.
#[tokio::test]
async fn sigterm_lets_requests_in_flight_finish() {
    let queue = unique_queue("http-shutdown");
    let config = config(&[&queue]);
    dispatcher(&config).await.close().await;
    let mut serve = Serve::builder(&serve_config(&[&queue], &TOKENS, "", ""))
        .start()
        .await;
    let http = client(None);
    // No worker: the job stays queued, its wait times out.
    let response = call(
        &http,
        &serve,
        "POST",
        &format!("/v1/queues/{queue}/jobs"),
        Some(SUBMIT),
        Some(r#"{"kind": "x", "payload": 1}"#),
    )
    .await;
    let id = json_of(response).await["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    let wait = {
        let http = http.clone();
        let url = serve.url(&format!("/v1/jobs/{id}/wait?timeout=3s"));
        tokio::spawn(async move { http.get(url).bearer_auth(READ).send().await })
    };
    // The request must have reached the server before the signal: this gives it time to be
    // read (the assertion is on its answer, not on any timing).
    tokio::time::sleep(Duration::from_millis(700)).await;
    serve.terminate();
    let response = wait
        .await
        .expect("the request task")
        .expect("an answer despite SIGTERM");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(json_of(response).await["state"], "pending");
    let status = serve.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status}: {}", serve.stderr());
    // And it no longer listens.
    assert!(std::net::TcpStream::connect(serve.address()).is_err());

    let connection = connect().await;
    let channel = connection.create_channel().await.expect("a channel");
    cleanup(&channel, &[&queue]).await;
}

/// Given the OpenAPI document at /openapi.json,
/// when every path and method it lists is called with an admin token (and, for a body, `{}`),
/// then the document is OpenAPI 3.1, lists exactly the API's routes (each with the bearer
/// scheme), and each answers with one of the status codes it documents.
#[tokio::test]
async fn every_documented_route_answers_as_documented() {
    let queue = unique_queue("http-openapi");
    let config = config(&[&queue]);
    dispatcher(&config).await.close().await;
    let serve = Serve::builder(&serve_config(&[&queue], &TOKENS, "", ""))
        .start()
        .await;
    let http = client(None);
    let response = http
        .get(serve.url("/openapi.json"))
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::OK);
    assert_safe_headers(&response, "/openapi.json");
    let document = json_of(response).await;
    let version = document["openapi"].as_str().expect("openapi");
    assert!(version.starts_with("3.1."), "{version}");
    let paths = document["paths"].as_object().expect("paths");
    let mut documented = Vec::new();
    for (path, operations) in paths {
        for (method, operation) in operations.as_object().expect("operations") {
            let method = method.to_uppercase();
            documented.push(format!("{method} {path}"));
            assert!(
                operation["security"].to_string().contains("bearer"),
                "{method} {path}: security"
            );
            let codes: Vec<u16> = operation["responses"]
                .as_object()
                .expect("responses")
                .keys()
                .map(|code| code.parse().expect("a status code"))
                .collect();
            let body = operation.get("requestBody").map(|_| "{}");
            let url = fill(path, &queue);
            let response = call(&http, &serve, &method, &url, Some(ADMIN), body).await;
            let status = response.status().as_u16();
            assert!(
                codes.contains(&status),
                "{method} {url}: {status} is not among the documented {codes:?}"
            );
        }
    }
    documented.sort();
    let mut expected: Vec<String> = ROUTES
        .iter()
        .map(|(m, p, _, _)| format!("{m} {p}"))
        .collect();
    expected.sort();
    assert_eq!(documented, expected);
    assert!(
        document["components"]["securitySchemes"]["bearer"]["scheme"]
            .as_str()
            .is_some_and(|s| s.eq_ignore_ascii_case("bearer"))
    );
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("a channel");
    cleanup(&channel, &[&queue]).await;
}

/// Given certificates from a test CA and `http.tls_cert_file`/`tls_key_file`,
/// when a client that trusts the CA calls the API over HTTPS,
/// then it is served (401 without a token, 200 with one), and a client that does not trust
/// the CA is refused at the handshake.
#[tokio::test]
async fn the_listener_speaks_tls_when_configured() {
    let certs = warren_tests::tls::CertDir::with_ca("http-tls");
    let (cert, key) = certs.server("server", false, &["127.0.0.1", "localhost"]);
    let http_extra = format!(
        "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
        cert.display(),
        key.display()
    );
    let queue = unique_queue("http-tls");
    let serve = Serve::builder(&serve_config(&[&queue], &TOKENS, &http_extra, ""))
        .start()
        .await;
    assert!(serve.base.starts_with("https://"), "{}", serve.base);
    let trusted = client(Some(&certs.file("ca.pem")));
    let response = trusted
        .get(serve.url("/v1/queues"))
        .send()
        .await
        .expect("an HTTPS answer");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = trusted
        .get(serve.url("/openapi.json"))
        .send()
        .await
        .expect("an HTTPS answer");
    assert_eq!(response.status(), StatusCode::OK);
    assert_safe_headers(&response, "https");
    let untrusting = client(None);
    let refused = untrusting.get(serve.url("/openapi.json")).send().await;
    assert!(refused.is_err(), "an untrusted certificate was accepted");
    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = client(None)
        .get(format!("http://{}/openapi.json", serve.address()))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered on the TLS port");
}

/// Given `WARREN_HTTP_TOKEN` and a token in the config,
/// when `warren config show` prints the effective configuration,
/// then neither token appears; names and scopes do.
#[tokio::test]
async fn config_show_masks_the_tokens() {
    let dir = std::env::temp_dir().join(format!("warren-http-config-{}", unique_queue("c")));
    std::fs::create_dir_all(&dir).expect("a folder");
    let path = dir.join("warren.toml");
    std::fs::write(&path, serve_config(&[], &TOKENS, "", "")).expect("the config");
    let run = warren_tests::cli::Warren::new(&[
        "--config",
        path.to_str().expect("utf-8"),
        "config",
        "show",
        "--json",
    ])
    .env("WARREN_HTTP_TOKEN", "env-token-0123456789abcdef")
    .run_async()
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(run.status.success(), "{}", run.stderr);
    for secret in [READ, SUBMIT, ADMIN, "env-token-0123456789abcdef"] {
        assert!(
            !run.stdout.contains(secret),
            "{secret} shown: {}",
            run.stdout
        );
        assert!(!run.stderr.contains(secret));
    }
    assert!(
        run.stdout.contains("operator") && run.stdout.contains("admin"),
        "{}",
        run.stdout
    );
}
