//! The HTTP side of the health probes, as a scraper sees it: a plain HTTP/1.1 `GET` (no client
//! library: the tests want the status line and headers exactly as sent), a free port to listen
//! on, and `/metrics` parsed with a Prometheus text-format parser (`prometheus-parse`).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A port of 127.0.0.1 that nothing listened on a moment ago.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener.local_addr().expect("its address").port()
}

/// `GET path` on `127.0.0.1:port`, within 5 s; `None` if nothing answers (not listening yet).
pub async fn get(port: u16, path: &str) -> Option<Response> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.ok()?;
        parse(&String::from_utf8_lossy(&raw))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
}

fn parse(raw: &str) -> Option<Response> {
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect::<Vec<_>>();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Some(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// Waits until `GET path` answers `status`, polling every 50 ms; the last answer (or `None`)
/// after `deadline`.
pub async fn wait_for_status(
    port: u16,
    path: &str,
    status: u16,
    deadline: Duration,
) -> Option<Response> {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let response = get(port, path).await;
        if response.as_ref().is_some_and(|r| r.status == status)
            || tokio::time::Instant::now() > until
        {
            return response;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `/metrics` parsed.
pub struct Scrape(pub prometheus_parse::Scrape);

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let lines = text.lines().map(|line| Ok(line.to_owned()));
        Scrape(prometheus_parse::Scrape::parse(lines).expect("parsing /metrics"))
    }

    /// Fetches and parses `/metrics` on `port`; panics if it does not answer 200 in the
    /// Prometheus text format.
    pub async fn fetch(port: u16) -> Scrape {
        let response = get(port, "/metrics").await.expect("GET /metrics answers");
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(
            response.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        Scrape::parse(&response.body)
    }

    /// The samples of `name` whose labels include all of `labels`.
    pub fn samples<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a prometheus_parse::Sample> + 'a {
        self.0.samples.iter().filter(move |sample| {
            sample.metric == name && labels.iter().all(|(k, v)| sample.labels.get(k) == Some(*v))
        })
    }

    /// The value of the one counter or gauge `name` with `labels` (0 if there is no such
    /// series; panics if several match).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<f64> = self
            .samples(name, labels)
            .map(|sample| match sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => panic!("{name} is not a counter or gauge"),
            })
            .collect();
        assert!(found.len() <= 1, "{name} {labels:?}: {found:?}");
        found.first().copied().unwrap_or(0.0)
    }

    /// The sum of every series of `name` with `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name, labels)
            .map(|sample| match sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    }

    /// How many observations the histogram `name` with `labels` counted (its `+Inf` bucket).
    pub fn histogram_count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name, labels)
            .filter_map(|sample| match &sample.value {
                prometheus_parse::Value::Histogram(buckets) => buckets
                    .iter()
                    .find(|b| b.less_than.is_infinite())
                    .map(|b| b.count),
                _ => None,
            })
            .sum()
    }
}
