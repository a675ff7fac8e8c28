//! A raw AMQP 0-9-1 publisher for hostile-producer tests: messages no well-behaved client
//! would (or could) write, sent to the test broker byte by byte.
//!
//! lapin's own serialiser is recursive and writes only what its types can hold, so a test
//! that wants, say, a header table nested 20,000 deep (which RabbitMQ accepts and passes on
//! to consumers) has to build the content header frame itself. Everything else here is plain:
//! the method frames (handshake, `channel.open`, `confirm.select`, `basic.publish`) are written
//! and read with amq-protocol's `gen_frame`/`parse_frame`; only the content header frame is
//! built by hand ([`content_header_frame`]). Content frames the broker sends back (a
//! `basic.return`'s) are skipped unparsed, so this tool never depends on the parser that
//! hostile input is aimed at.
//!
//! The connection asks for 128 KiB frames (RabbitMQ's default `frame_max`), enables publisher
//! confirms on channel 1, and every publish is `mandatory` and waits for its `basic.ack`: a
//! returned (unroutable), nacked or refused message is an error, never a silent drop.
//!
//! ```no_run
//! # async fn example() -> Result<(), warren_tests::raw_amqp::RawAmqpError> {
//! use warren_tests::raw_amqp::{self, RawMessage};
//! let headers = raw_amqp::deep_headers(20_000);
//! let message = RawMessage::job("my-queue", "job-1", "echo", &headers, b"{}");
//! raw_amqp::publish_once(&warren_tests::broker_url(), &message).await
//! # }
//! ```

use std::time::Duration;

use amq_protocol::frame::{
    AMQPFrame, GenError, ProtocolVersion, WriteContext, gen_frame, parse_frame,
};
use amq_protocol::protocol::{AMQPClass, basic, channel, confirm, connection, constants};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use amq_protocol::uri::{AMQPScheme, AMQPUri};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The frame size asked for: RabbitMQ's default, so one content header can be ~128 KiB.
pub const FRAME_MAX: u32 = 128 * 1024;

/// How long any one step (connecting, a reply, a confirm) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The channel everything is published on.
const CHANNEL: u16 = 1;

/// The basic class, whose content header this builds.
const BASIC_CLASS: u16 = 60;

/// Frame type octets (AMQP 0-9-1 §4.2.3).
const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;

/// Bytes around a frame's payload: type, channel, size, and the end octet.
const FRAME_OVERHEAD: usize = 8;

/// Why a raw publish did not end in a `basic.ack`.
#[derive(Debug, thiserror::Error)]
pub enum RawAmqpError {
    #[error("invalid broker URL: {0}")]
    Url(String),
    #[error("only plain amqp:// is supported by the raw publisher")]
    Tls,
    #[error("I/O with the broker: {0}")]
    Io(#[from] std::io::Error),
    #[error("no reply from the broker within {STEP_TIMEOUT:?} while waiting for {0}")]
    Timeout(&'static str),
    #[error("the broker sent something unexpected while waiting for {waiting_for}: {got}")]
    Unexpected {
        waiting_for: &'static str,
        got: String,
    },
    #[error("the broker closed the {what}: {reply_code} {reply_text}")]
    Closed {
        what: &'static str,
        reply_code: u16,
        reply_text: String,
    },
    #[error("the broker returned the message as unroutable: {reply_code} {reply_text}")]
    Returned { reply_code: u16, reply_text: String },
    #[error("the broker refused the message (basic.nack)")]
    Nacked,
    #[error("{what} is {len} bytes, more than {max} fit")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("serialising a method frame: {0:?}")]
    Generate(GenError),
}

/// One message to publish, its properties spelled out. `headers` is an encoded field table
/// (u32 length, then entries: e.g. from [`deep_headers`]); empty means no header table.
#[derive(Debug, Clone, Copy)]
pub struct RawMessage<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub message_id: &'a str,
    /// The AMQP `type` property (a Warren job's kind).
    pub kind: &'a str,
    pub content_type: &'a str,
    pub headers: &'a [u8],
    pub body: &'a [u8],
}

impl<'a> RawMessage<'a> {
    /// A Warren-style job for `queue` (default exchange, JSON content type).
    pub fn job(
        queue: &'a str,
        message_id: &'a str,
        kind: &'a str,
        headers: &'a [u8],
        body: &'a [u8],
    ) -> RawMessage<'a> {
        RawMessage {
            exchange: "",
            routing_key: queue,
            message_id,
            kind,
            content_type: "application/json",
            headers,
            body,
        }
    }
}

/// Connects to `url`, publishes `message` and waits for its confirm, then closes.
pub async fn publish_once(url: &str, message: &RawMessage<'_>) -> Result<(), RawAmqpError> {
    let mut publisher = RawPublisher::connect(url).await?;
    publisher.publish(message).await?;
    publisher.close().await
}

/// An encoded header table nested `depth` tables deep (the header table itself counts):
/// each level is the only entry, under the empty key, of the one around it, and the innermost
/// is empty. A level costs 6 bytes (length 4, key 1, type tag 1), so 20,000 levels are
/// 119,998 bytes: they fit in one 128 KiB frame.
///
/// Built outer to inner with each length computed up front: O(depth), no copying.
pub fn deep_headers(depth: usize) -> Vec<u8> {
    const LENGTH: usize = 4;
    const ENTRY: usize = 2; // key length 0, then the type tag 'F'
    let levels = depth.max(1);
    let mut bytes = Vec::with_capacity(levels * (LENGTH + ENTRY));
    for level in 0..levels {
        let inner_levels = levels - 1 - level;
        let content_len = inner_levels * (LENGTH + ENTRY);
        bytes.extend_from_slice(&(content_len as u32).to_be_bytes());
        if inner_levels > 0 {
            bytes.extend_from_slice(&[0, b'F']);
        }
    }
    bytes
}

/// A content header frame for `message` on `channel`, built byte by byte (AMQP 0-9-1 §4.2.6
/// and the basic class's property list): class, weight, body size, property flags, then the
/// properties present (content-type, headers, delivery-mode 2, message-id, type) in order.
pub fn content_header_frame(
    channel: u16,
    message: &RawMessage<'_>,
) -> Result<Vec<u8>, RawAmqpError> {
    const CONTENT_TYPE: u16 = 1 << 15;
    const HEADERS: u16 = 1 << 13;
    const DELIVERY_MODE: u16 = 1 << 12;
    const MESSAGE_ID: u16 = 1 << 7;
    const TYPE: u16 = 1 << 5;
    const PERSISTENT: u8 = 2;

    let mut flags = CONTENT_TYPE | DELIVERY_MODE | MESSAGE_ID | TYPE;
    if !message.headers.is_empty() {
        flags |= HEADERS;
    }
    let mut payload = Vec::with_capacity(64 + message.headers.len());
    payload.extend_from_slice(&BASIC_CLASS.to_be_bytes());
    payload.extend_from_slice(&0u16.to_be_bytes()); // weight
    payload.extend_from_slice(&(message.body.len() as u64).to_be_bytes());
    payload.extend_from_slice(&flags.to_be_bytes());
    short_string(&mut payload, "content type", message.content_type)?;
    payload.extend_from_slice(message.headers);
    payload.push(PERSISTENT);
    short_string(&mut payload, "message id", message.message_id)?;
    short_string(&mut payload, "type", message.kind)?;

    let len = u32::try_from(payload.len()).map_err(|_| RawAmqpError::TooLong {
        what: "the content header",
        len: payload.len(),
        max: u32::MAX as usize,
    })?;
    let mut frame = Vec::with_capacity(payload.len() + FRAME_OVERHEAD);
    frame.push(FRAME_HEADER);
    frame.extend_from_slice(&channel.to_be_bytes());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&payload);
    frame.push(constants::FRAME_END);
    Ok(frame)
}

/// Appends an AMQP short string (length octet, then the bytes).
fn short_string(out: &mut Vec<u8>, what: &'static str, value: &str) -> Result<(), RawAmqpError> {
    let len = u8::try_from(value.len()).map_err(|_| RawAmqpError::TooLong {
        what,
        len: value.len(),
        max: u8::MAX as usize,
    })?;
    out.push(len);
    out.extend_from_slice(value.as_bytes());
    Ok(())
}

/// A connection with one confirm channel, publishing [`RawMessage`]s.
pub struct RawPublisher {
    stream: TcpStream,
    /// The negotiated frame size: no frame sent may be larger.
    frame_max: u32,
    /// The delivery tag the next publish gets (confirm mode counts publishes from 1).
    next_tag: u64,
}

/// A frame read from the broker.
enum Incoming {
    Method(AMQPClass),
    /// A content header or body (of a `basic.return`), not parsed.
    Content,
    Heartbeat,
}

impl RawPublisher {
    /// Connects and shakes hands (asking for [`FRAME_MAX`] frames and no heartbeats), opens
    /// channel 1 and puts it in confirm mode.
    pub async fn connect(url: &str) -> Result<RawPublisher, RawAmqpError> {
        let uri: AMQPUri = url.parse().map_err(RawAmqpError::Url)?;
        if uri.scheme != AMQPScheme::AMQP {
            return Err(RawAmqpError::Tls);
        }
        let address = (uri.authority.host.as_str(), uri.authority.port);
        let stream = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(address))
            .await
            .map_err(|_| RawAmqpError::Timeout("the TCP connection"))??;
        let mut publisher = RawPublisher {
            stream,
            frame_max: FRAME_MAX,
            next_tag: 1,
        };
        publisher.handshake(&uri).await?;
        Ok(publisher)
    }

    /// Publishes `message` (`mandatory`) and waits for its `basic.ack`.
    pub async fn publish(&mut self, message: &RawMessage<'_>) -> Result<(), RawAmqpError> {
        let header = content_header_frame(CHANNEL, message)?;
        if header.len() > self.frame_max as usize {
            return Err(RawAmqpError::TooLong {
                what: "the content header frame",
                len: header.len(),
                max: self.frame_max as usize,
            });
        }
        let publish = basic::Publish {
            exchange: message.exchange.into(),
            routing_key: message.routing_key.into(),
            mandatory: true,
            immediate: false,
        };
        let mut bytes = frame_bytes(&AMQPFrame::Method(
            CHANNEL,
            AMQPClass::Basic(basic::AMQPMethod::Publish(publish)),
        ))?;
        bytes.extend_from_slice(&header);
        let chunk = self.frame_max as usize - FRAME_OVERHEAD;
        for part in message.body.chunks(chunk) {
            bytes.extend_from_slice(&frame_bytes(&AMQPFrame::Body(CHANNEL, part.to_vec()))?);
        }
        self.stream.write_all(&bytes).await?;
        let tag = self.next_tag;
        self.next_tag += 1;
        self.await_confirm(tag).await
    }

    /// Closes the connection politely.
    pub async fn close(mut self) -> Result<(), RawAmqpError> {
        let close = connection::Close {
            reply_code: 200,
            reply_text: "done".into(),
            class_id: 0,
            method_id: 0,
        };
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(close)),
        )
        .await?;
        self.expect("connection.close-ok", |class| {
            matches!(
                class,
                AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))
            )
        })
        .await?;
        Ok(())
    }

    async fn handshake(&mut self, uri: &AMQPUri) -> Result<(), RawAmqpError> {
        let header = frame_bytes(&AMQPFrame::ProtocolHeader(ProtocolVersion::amqp_0_9_1()))?;
        self.stream.write_all(&header).await?;
        self.expect("connection.start", |class| {
            matches!(
                class,
                AMQPClass::Connection(connection::AMQPMethod::Start(_))
            )
        })
        .await?;

        let mut client_properties = FieldTable::default();
        client_properties.insert(
            "product".into(),
            AMQPValue::LongString("warren-tests raw_amqp".into()),
        );
        client_properties.insert(
            "connection_name".into(),
            AMQPValue::LongString("warren-tests-raw-publisher".into()),
        );
        let user = &uri.authority.userinfo;
        let response = format!("\0{}\0{}", user.username, user.password);
        let start_ok = connection::StartOk {
            client_properties,
            mechanism: "PLAIN".into(),
            response: LongString::from(response),
            locale: "en_US".into(),
        };
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)),
        )
        .await?;

        let tune = self
            .expect("connection.tune", |class| {
                matches!(
                    class,
                    AMQPClass::Connection(connection::AMQPMethod::Tune(_))
                )
            })
            .await?;
        let AMQPClass::Connection(connection::AMQPMethod::Tune(tune)) = tune else {
            unreachable!("expect returned the method it matched");
        };
        if tune.frame_max != 0 {
            self.frame_max = self.frame_max.min(tune.frame_max);
        }
        let tune_ok = connection::TuneOk {
            channel_max: tune.channel_max,
            frame_max: self.frame_max,
            heartbeat: 0,
        };
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok)),
        )
        .await?;
        let open = connection::Open {
            virtual_host: ShortString::from(uri.vhost.clone()),
        };
        self.send_method(0, AMQPClass::Connection(connection::AMQPMethod::Open(open)))
            .await?;
        self.expect("connection.open-ok", |class| {
            matches!(
                class,
                AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))
            )
        })
        .await?;

        let open = channel::Open {};
        self.send_method(CHANNEL, AMQPClass::Channel(channel::AMQPMethod::Open(open)))
            .await?;
        self.expect("channel.open-ok", |class| {
            matches!(class, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)))
        })
        .await?;
        let select = confirm::Select { nowait: false };
        self.send_method(
            CHANNEL,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(select)),
        )
        .await?;
        self.expect("confirm.select-ok", |class| {
            matches!(class, AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_)))
        })
        .await?;
        Ok(())
    }

    /// Waits for the confirm of `tag`; a `basic.return` before it makes the publish fail.
    async fn await_confirm(&mut self, tag: u64) -> Result<(), RawAmqpError> {
        let mut returned = None;
        loop {
            match self.next_method("basic.ack").await? {
                AMQPClass::Basic(basic::AMQPMethod::Return(r)) => {
                    returned = Some(RawAmqpError::Returned {
                        reply_code: r.reply_code,
                        reply_text: r.reply_text.to_string(),
                    });
                }
                AMQPClass::Basic(basic::AMQPMethod::Ack(ack))
                    if ack.delivery_tag == tag || (ack.multiple && ack.delivery_tag >= tag) =>
                {
                    return returned.map_or(Ok(()), Err);
                }
                AMQPClass::Basic(basic::AMQPMethod::Nack(nack))
                    if nack.delivery_tag == tag || (nack.multiple && nack.delivery_tag >= tag) =>
                {
                    return Err(RawAmqpError::Nacked);
                }
                other => {
                    return Err(RawAmqpError::Unexpected {
                        waiting_for: "basic.ack",
                        got: format!("{other:?}"),
                    });
                }
            }
        }
    }

    /// Reads methods until one matches `wanted`; anything else is an error.
    async fn expect(
        &mut self,
        waiting_for: &'static str,
        wanted: impl Fn(&AMQPClass) -> bool,
    ) -> Result<AMQPClass, RawAmqpError> {
        let class = self.next_method(waiting_for).await?;
        if wanted(&class) {
            Ok(class)
        } else {
            Err(RawAmqpError::Unexpected {
                waiting_for,
                got: format!("{class:?}"),
            })
        }
    }

    /// The next method frame (skipping heartbeats and content); the broker closing the
    /// connection or channel is an error.
    async fn next_method(&mut self, waiting_for: &'static str) -> Result<AMQPClass, RawAmqpError> {
        loop {
            let incoming = tokio::time::timeout(STEP_TIMEOUT, self.read_frame(waiting_for))
                .await
                .map_err(|_| RawAmqpError::Timeout(waiting_for))??;
            match incoming {
                Incoming::Method(AMQPClass::Connection(connection::AMQPMethod::Close(close))) => {
                    return Err(RawAmqpError::Closed {
                        what: "connection",
                        reply_code: close.reply_code,
                        reply_text: close.reply_text.to_string(),
                    });
                }
                Incoming::Method(AMQPClass::Channel(channel::AMQPMethod::Close(close))) => {
                    return Err(RawAmqpError::Closed {
                        what: "channel",
                        reply_code: close.reply_code,
                        reply_text: close.reply_text.to_string(),
                    });
                }
                Incoming::Method(class) => return Ok(class),
                Incoming::Content | Incoming::Heartbeat => continue,
            }
        }
    }

    /// Reads one whole frame. Method frames are parsed; content frames are only skipped.
    async fn read_frame(&mut self, waiting_for: &'static str) -> Result<Incoming, RawAmqpError> {
        let mut head = [0u8; 7];
        self.stream.read_exact(&mut head).await?;
        let frame_type = head[0];
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        if size + FRAME_OVERHEAD > self.frame_max.max(FRAME_MAX) as usize {
            return Err(RawAmqpError::Unexpected {
                waiting_for,
                got: format!("a frame of {size} bytes, over frame_max"),
            });
        }
        let mut frame = Vec::with_capacity(head.len() + size + 1);
        frame.extend_from_slice(&head);
        frame.resize(head.len() + size + 1, 0);
        self.stream.read_exact(&mut frame[head.len()..]).await?;
        match frame_type {
            FRAME_METHOD => match parse_frame(frame.as_slice()) {
                Ok((_, AMQPFrame::Method(_, class))) => Ok(Incoming::Method(class)),
                Ok((_, other)) => Err(RawAmqpError::Unexpected {
                    waiting_for,
                    got: other.to_string(),
                }),
                Err(err) => Err(RawAmqpError::Unexpected {
                    waiting_for,
                    got: format!("an unparsable method frame: {err}"),
                }),
            },
            FRAME_HEADER | FRAME_BODY => Ok(Incoming::Content),
            FRAME_HEARTBEAT => Ok(Incoming::Heartbeat),
            other => Err(RawAmqpError::Unexpected {
                waiting_for,
                got: format!("a frame of type {other}"),
            }),
        }
    }

    async fn send_method(&mut self, channel: u16, class: AMQPClass) -> Result<(), RawAmqpError> {
        let bytes = frame_bytes(&AMQPFrame::Method(channel, class))?;
        self.stream.write_all(&bytes).await?;
        Ok(())
    }
}

/// A frame serialised by amq-protocol.
fn frame_bytes(frame: &AMQPFrame) -> Result<Vec<u8>, RawAmqpError> {
    let context =
        gen_frame(frame)(WriteContext::from(Vec::new())).map_err(RawAmqpError::Generate)?;
    Ok(context.write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::BasicProperties;
    use lapin::types::FieldTable as LapinTable;

    /// The same nesting as [`deep_headers`], as a value (for small depths only: it is
    /// serialised recursively).
    fn nested(depth: usize) -> LapinTable {
        let mut table = LapinTable::default();
        for _ in 1..depth {
            let mut outer = LapinTable::default();
            outer.insert("".into(), AMQPValue::FieldTable(table));
            table = outer;
        }
        table
    }

    fn serialised(table: &LapinTable) -> Vec<u8> {
        let context =
            amq_protocol::types::generation::gen_field_table(table)(WriteContext::from(Vec::new()))
                .expect("serialising a table");
        context.write
    }

    #[test]
    fn deep_headers_match_the_serialised_nested_table() {
        for depth in [1, 2, 3, 10] {
            assert_eq!(deep_headers(depth), serialised(&nested(depth)), "{depth}");
        }
    }

    #[test]
    fn twenty_thousand_levels_fit_in_one_128_kib_frame() {
        let headers = deep_headers(20_000);
        assert_eq!(headers.len(), 6 * 20_000 - 2);
        let message = RawMessage::job("q", "id", "echo", &headers, b"{}");
        let frame = content_header_frame(CHANNEL, &message).expect("a frame");
        assert!(frame.len() <= FRAME_MAX as usize, "{}", frame.len());
        assert!(frame.len() > 16 * 1024, "needs more than 16 KiB frames");
    }

    /// The hand-built frame is byte for byte what amq-protocol writes for the same properties.
    #[test]
    fn content_header_frame_matches_amq_protocol() {
        let headers = nested(3);
        let encoded = serialised(&headers);
        let message = RawMessage::job("q", "job-1", "echo", &encoded, b"{\"n\":1}");
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_message_id("job-1".into())
            .with_type("echo".into());
        let expected = frame_bytes(&AMQPFrame::Header(
            CHANNEL,
            amq_protocol::frame::AMQPContentHeader {
                class_id: BASIC_CLASS,
                body_size: 7,
                properties,
            },
        ))
        .expect("a frame");
        assert_eq!(
            content_header_frame(CHANNEL, &message).expect("a frame"),
            expected
        );
    }

    #[test]
    fn short_strings_longer_than_255_bytes_are_refused() {
        let id = "x".repeat(256);
        let message = RawMessage::job("q", &id, "echo", &[], b"");
        assert!(matches!(
            content_header_frame(CHANNEL, &message),
            Err(RawAmqpError::TooLong { .. })
        ));
    }
}
