//! A checkpointed key-value HTTP service on Lazarus.
//!
//! `PUT /kv/{key}` (body = value), `GET /kv/{key}`, `DELETE /kv/{key}`, and
//! `GET /health`. The state is a [`KeyedState`] checkpointed like any
//! other; the service runs as a source operator with no outputs, on a VIP,
//! with a hot standby (see `job.toml` and `README.md`).
//!
//! What is acknowledged when:
//! - a `PUT` or `DELETE` is answered only after the checkpoint that holds it
//!   has committed: an acknowledged write survives any failover;
//! - a `GET` of a key with a write not yet acknowledged waits for that
//!   write's checkpoint too, so a read never returns a value that a failover
//!   could take back; other `GET`s are answered at once.
//!
//! Write latency is therefore about one checkpoint interval plus the
//! commit. A client whose write got no answer (the primary died first)
//! does not know whether it was applied, as with any database; it retries.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv6Addr, SocketAddr};

use lazarus_sdk::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// The operator kinds of this binary.
pub fn registry() -> Registry {
    Registry::new().source("kv-service", KvService::new)
}

/// Largest key, bytes.
pub const MAX_KEY: usize = 256;
/// Largest value, bytes.
pub const MAX_VALUE: usize = 1 << 20;
/// Largest request head, bytes.
const MAX_HEAD: usize = 16 << 10;
/// Requests queued for the state loop before new ones get 503.
const QUEUE: usize = 4096;

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body.
    pub body: Vec<u8>,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            body: body.into().into_bytes(),
        }
    }
}

/// A request for the state loop.
#[derive(Debug)]
pub enum Op {
    /// Store `value` under `key`.
    Put(String, Vec<u8>),
    /// Read `key`.
    Get(String),
    /// Remove `key`.
    Delete(String),
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Response>,
}

/// An answer held until a checkpoint commits.
struct Held {
    reply: oneshot::Sender<Response>,
    response: Response,
    /// The key whose write this is (its dirty mark goes when it is durable).
    write: Option<String>,
}

/// The service: keyed state plus the answers waiting for commits.
pub struct KvService {
    state: KeyedState<String, Vec<u8>>,
    requests: mpsc::Receiver<Request>,
    /// Answers to requests applied since the last snapshot.
    unsnapped: Vec<Held>,
    /// Answers per checkpoint, released when it (or a later one) commits.
    staged: VecDeque<(CheckpointId, Vec<Held>)>,
    /// Keys with writes not yet acknowledged, and how many.
    dirty: HashMap<String, usize>,
    _server: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl KvService {
    /// Binds the port (parameter `lazarus.port`, set from the operator's
    /// `port`, or `port`) on all addresses, so it serves whatever VIP the
    /// agent adds to this host. Requests wait in a queue until the state is
    /// restored and the worker processes them.
    pub fn new(ctx: &Context) -> Result<KvService, BoxError> {
        if ctx.parallelism != 1 {
            return Err(format!(
                "kv-service serves one VIP: parallelism must be 1, got {}",
                ctx.parallelism
            )
            .into());
        }
        let port: u16 = ctx
            .params
            .get("lazarus.port")
            .or_else(|| ctx.params.get("port"))
            .ok_or("kv-service needs a port: set `port` on the operator")?
            .parse()
            .map_err(|e| format!("kv-service port: {e}"))?;
        let listener = bind(port)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let server = tokio::spawn(serve(listener, tx));
        Ok(KvService {
            state: KeyedState::new("kv", ctx),
            requests: rx,
            unsnapped: Vec::new(),
            staged: VecDeque::new(),
            dirty: HashMap::new(),
            _server: AbortOnDrop(server),
        })
    }

    /// Applies one request; the answer is sent now or held for a commit.
    fn apply(&mut self, req: Request) {
        match req.op {
            Op::Put(key, value) => {
                let created = self.state.get(&key).is_none();
                *self.state.entry(key.clone()).or_default() = value;
                self.hold(
                    req.reply,
                    Response::text(if created { 201 } else { 204 }, ""),
                    Some(key),
                );
            }
            Op::Delete(key) => {
                let response = match self.state.remove(&key) {
                    Some(_) => Response::text(204, ""),
                    None => Response::text(404, format!("no key {key:?}\n")),
                };
                self.hold(req.reply, response, Some(key));
            }
            Op::Get(key) => {
                let response = match self.state.get(&key) {
                    Some(v) => Response {
                        status: 200,
                        body: v.clone(),
                    },
                    None => Response::text(404, format!("no key {key:?}\n")),
                };
                if self.dirty.contains_key(&key) {
                    self.hold(req.reply, response, None);
                } else {
                    let _ = req.reply.send(response);
                }
            }
        }
    }

    fn hold(
        &mut self,
        reply: oneshot::Sender<Response>,
        response: Response,
        write: Option<String>,
    ) {
        if let Some(k) = &write {
            *self.dirty.entry(k.clone()).or_default() += 1;
        }
        self.unsnapped.push(Held {
            reply,
            response,
            write,
        });
    }
}

impl Source for KvService {
    fn poll(&mut self, _out: &mut Emitter, max: usize) -> Result<SourcePoll, BoxError> {
        let mut n = 0;
        while n < max {
            match self.requests.try_recv() {
                Ok(req) => {
                    self.apply(req);
                    n += 1;
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return Err("kv-service: the HTTP listener stopped".into())
                }
            }
        }
        Ok(if n == 0 {
            SourcePoll::Idle
        } else {
            SourcePoll::Ready
        })
    }

    fn prepare_snapshot(&mut self, checkpoint: CheckpointId) {
        let held = std::mem::take(&mut self.unsnapped);
        self.staged.push_back((checkpoint, held));
    }

    fn snapshot(&mut self) -> Snapshot {
        self.state.snapshot()
    }

    fn restore(&mut self, state: &Restored) -> Result<(), BoxError> {
        self.state.restore(state)
    }

    fn committed(&mut self, checkpoint: CheckpointId) -> Result<(), BoxError> {
        while self.staged.front().is_some_and(|(n, _)| *n <= checkpoint) {
            let (_, held) = self.staged.pop_front().expect("checked");
            for h in held {
                if let Some(k) = &h.write {
                    if let Some(c) = self.dirty.get_mut(k) {
                        *c -= 1;
                        if *c == 0 {
                            self.dirty.remove(k);
                        }
                    }
                }
                let _ = h.reply.send(h.response);
            }
        }
        Ok(())
    }
}

/// Binds `[::]:port` (IPv4 too, as mapped addresses), or `0.0.0.0:port`
/// where IPv6 is off. SO_REUSEADDR: a restart on the same host must not
/// wait for old connections in TIME_WAIT.
fn bind(port: u16) -> Result<TcpListener, BoxError> {
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let try_bind = |addr: SocketAddr| -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv6() {
            tokio::net::TcpSocket::new_v6()?
        } else {
            tokio::net::TcpSocket::new_v4()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(1024)
    };
    try_bind(v6)
        .or_else(|_| try_bind(SocketAddr::from(([0, 0, 0, 0], port))))
        .map_err(|e| format!("kv-service: binding port {port}: {e}").into())
}

async fn serve(listener: TcpListener, requests: mpsc::Sender<Request>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            let _ = connection(stream, requests).await;
        });
    }
}

/// One client connection: HTTP/1.1 requests in order, keep-alive.
async fn connection(mut stream: TcpStream, requests: mpsc::Sender<Request>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let (head_len, head) = loop {
            if let Some(pos) = find(&buf, b"\r\n\r\n") {
                break (pos + 4, String::from_utf8_lossy(&buf[..pos]).to_string());
            }
            if buf.len() > MAX_HEAD {
                return write_response(
                    &mut stream,
                    &Response::text(431, "request head too large\n"),
                    true,
                )
                .await;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let parsed = match parse_head(&head) {
            Ok(p) => p,
            Err(r) => return write_response(&mut stream, &r, true).await,
        };
        let total = head_len + parsed.content_length;
        while buf.len() < total {
            let mut chunk = vec![0u8; (total - buf.len()).min(64 << 10)];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = buf[head_len..total].to_vec();
        buf.drain(..total);
        let response = match route(&parsed.method, &parsed.path, body) {
            Err(r) => r,
            Ok(None) => Response::text(200, "ok\n"),
            Ok(Some(op)) => {
                let (tx, rx) = oneshot::channel();
                match requests.try_send(Request { op, reply: tx }) {
                    Ok(()) => match rx.await {
                        Ok(r) => r,
                        // The worker is going down (failover): no answer is
                        // an honest answer; the client retries elsewhere.
                        Err(_) => return Ok(()),
                    },
                    Err(_) => Response::text(503, "busy: request queue full\n"),
                }
            }
        };
        write_response(&mut stream, &response, parsed.close).await?;
        if parsed.close {
            return Ok(());
        }
    }
}

#[derive(Debug)]
struct Head {
    method: String,
    path: String,
    content_length: usize,
    close: bool,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_head(head: &str) -> Result<Head, Response> {
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Response::text(
            400,
            format!("malformed request line {request_line:?}\n"),
        ));
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(Response::text(
            505,
            format!("unsupported version {version:?}\n"),
        ));
    }
    let mut content_length = 0usize;
    let mut close = version == "HTTP/1.0";
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(Response::text(
                400,
                format!("malformed header line {line:?}\n"),
            ));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                content_length = value
                    .parse()
                    .map_err(|_| Response::text(400, format!("bad Content-Length {value:?}\n")))?;
                if content_length > MAX_VALUE {
                    return Err(Response::text(
                        413,
                        format!("values are at most {MAX_VALUE} bytes\n"),
                    ));
                }
            }
            "transfer-encoding" => {
                return Err(Response::text(
                    411,
                    "send a Content-Length, not a chunked body\n",
                ))
            }
            "connection" => close = value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    Ok(Head {
        method: method.to_string(),
        path: path.to_string(),
        content_length,
        close,
    })
}

/// Maps a request to an operation; `Ok(None)` is the health check.
pub fn route(method: &str, path: &str, body: Vec<u8>) -> Result<Option<Op>, Response> {
    if path == "/health" {
        return if method == "GET" {
            Ok(None)
        } else {
            Err(Response::text(405, "GET /health only\n"))
        };
    }
    let Some(key) = path.strip_prefix("/kv/") else {
        return Err(Response::text(
            404,
            format!("no route {path:?}; use /kv/{{key}}\n"),
        ));
    };
    if key.is_empty()
        || key.len() > MAX_KEY
        || !key.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
    {
        return Err(Response::text(
            400,
            format!("key must be 1 to {MAX_KEY} visible ASCII characters without '/'\n"),
        ));
    }
    let key = key.to_string();
    match method {
        "PUT" => Ok(Some(Op::Put(key, body))),
        "GET" => Ok(Some(Op::Get(key))),
        "DELETE" => Ok(Some(Op::Delete(key))),
        other => Err(Response::text(
            405,
            format!("method {other} not allowed; use PUT, GET or DELETE\n"),
        )),
    }
}

async fn write_response(stream: &mut TcpStream, r: &Response, close: bool) -> std::io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Status",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n{}\r\n",
        r.status,
        r.body.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes();
    out.extend_from_slice(&r.body);
    stream.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_routes_and_rejects_bad_requests() {
        assert!(
            matches!(route("PUT", "/kv/a", b"1".to_vec()), Ok(Some(Op::Put(k, v))) if k == "a" && v == b"1")
        );
        assert!(matches!(route("GET", "/health", vec![]), Ok(None)));
        assert_eq!(
            route("POST", "/kv/a", vec![]).err().map(|r| r.status),
            Some(405)
        );
        assert_eq!(
            route("GET", "/nope", vec![]).err().map(|r| r.status),
            Some(404)
        );
        assert_eq!(
            route("GET", "/kv/", vec![]).err().map(|r| r.status),
            Some(400)
        );
        assert_eq!(
            route("GET", &format!("/kv/{}", "x".repeat(300)), vec![])
                .err()
                .map(|r| r.status),
            Some(400)
        );
        assert_eq!(parse_head("GET /kv/a").err().map(|r| r.status), Some(400));
        assert_eq!(
            parse_head("GET /kv/a HTTP/2").err().map(|r| r.status),
            Some(505)
        );
        assert_eq!(
            parse_head("PUT /kv/a HTTP/1.1\r\nContent-Length: x")
                .err()
                .map(|r| r.status),
            Some(400)
        );
        assert_eq!(
            parse_head("PUT /kv/a HTTP/1.1\r\nContent-Length: 99999999")
                .err()
                .map(|r| r.status),
            Some(413)
        );
        assert_eq!(
            parse_head("PUT /kv/a HTTP/1.1\r\nTransfer-Encoding: chunked")
                .err()
                .map(|r| r.status),
            Some(411)
        );
        let h = parse_head("PUT /kv/a HTTP/1.1\r\nContent-Length: 3\r\nConnection: close")
            .expect("valid");
        assert_eq!((h.content_length, h.close), (3, true));
    }

    #[tokio::test]
    async fn test_writes_are_answered_only_after_their_checkpoint_commits() {
        let mut ctx = Context::for_test("kv", 0, 1);
        ctx.params.insert("port".into(), "0".into());
        let mut kv = KvService::new(&ctx).expect("service");
        let (put_tx, mut put_rx) = oneshot::channel();
        kv.apply(Request {
            op: Op::Put("k".into(), b"v1".to_vec()),
            reply: put_tx,
        });
        // A read of a key with an unacknowledged write waits with it.
        let (get_tx, mut get_rx) = oneshot::channel();
        kv.apply(Request {
            op: Op::Get("k".into()),
            reply: get_tx,
        });
        // A read of a clean key is answered at once.
        let (other_tx, mut other_rx) = oneshot::channel();
        kv.apply(Request {
            op: Op::Get("other".into()),
            reply: other_tx,
        });
        assert_eq!(other_rx.try_recv().expect("answered").status, 404);
        assert!(put_rx.try_recv().is_err() && get_rx.try_recv().is_err());
        kv.prepare_snapshot(CheckpointId(7));
        let _ = kv.snapshot();
        kv.committed(CheckpointId(6)).expect("commit");
        assert!(
            put_rx.try_recv().is_err(),
            "an older checkpoint does not cover the write"
        );
        kv.committed(CheckpointId(7)).expect("commit");
        assert_eq!(put_rx.try_recv().expect("acknowledged").status, 201);
        assert_eq!(get_rx.try_recv().expect("answered").body, b"v1");
        // Clean again: reads are immediate.
        let (tx, mut rx) = oneshot::channel();
        kv.apply(Request {
            op: Op::Get("k".into()),
            reply: tx,
        });
        assert_eq!(rx.try_recv().expect("immediate").body, b"v1");
    }
}
