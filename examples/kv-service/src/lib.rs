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
//!
//! **Active-active**: with `parallelism = N` and `vips = [N addresses]`,
//! each instance owns a share of the key groups and serves its own VIP
//! (bound with `IP_FREEBIND`, so two instances can share a host after a
//! failover). A request for a key another instance owns is forwarded to
//! the owner's VIP and its answer relayed: any VIP answers for any key, and
//! a forwarded write is acknowledged only once the owner's checkpoint holding
//! it has committed. A forwarded request carries `X-Lazarus-Forwarded`; one
//! that reaches a non-owner anyway gets 421 instead of going round again.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv6Addr, SocketAddr};

use lazarus_sdk::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// The operator kinds of this binary.
///
/// A hot standby builds the service as soon as it follows, and keeps its
/// state restored to every checkpoint it follows: a promotion finds the
/// state decoded in memory. The service binds its port at its first poll,
/// that is once it is primary.
pub fn registry() -> Registry {
    Registry::new().following_source("kv-service", KvService::new)
}

/// How long the first poll retries a port still held by the instance this
/// one replaces in the same process (a rollback in place).
const BIND_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Largest key, bytes.
pub const MAX_KEY: usize = 256;
/// Largest value, bytes.
pub const MAX_VALUE: usize = 1 << 20;
/// Largest request head, bytes.
const MAX_HEAD: usize = 16 << 10;
/// Requests queued for the state loop before new ones get 503.
const QUEUE: usize = 4096;
/// A forwarded request must be answered within this (it waits for the
/// owner's checkpoint to commit).
const FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The header that marks a request forwarded by another instance.
const FORWARDED: &str = "x-lazarus-forwarded";

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

impl Op {
    /// The key it is about.
    pub fn key(&self) -> &str {
        match self {
            Op::Put(k, _) | Op::Get(k) | Op::Delete(k) => k,
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
    /// Which keys this instance owns (active-active).
    shares: Shares,
    listener: Listener,
}

/// The HTTP listener: bound at the first poll (a hot standby is built
/// long before it serves anything), then serving.
enum Listener {
    Unbound {
        port: u16,
        requests: mpsc::Sender<Request>,
        since: Option<std::time::Instant>,
    },
    Serving {
        _server: AbortOnDrop,
    },
}

/// Who owns which key: the job's key groups spread over the instances
/// (Flink's key-group model), and every instance's VIP to forward to.
#[derive(Debug, Clone)]
pub struct Shares {
    index: u32,
    parallelism: u32,
    key_groups: u32,
    /// Every instance's VIP, by index (empty with parallelism 1).
    peers: Vec<std::net::IpAddr>,
    /// This instance's VIP, bound instead of every address (active-active).
    own: Option<std::net::IpAddr>,
}

impl Shares {
    /// From the operator's context: `lazarus.peers` (one VIP per instance,
    /// set from the operator's `vips`) is required with parallelism above 1.
    pub fn from_context(ctx: &Context) -> Result<Shares, BoxError> {
        let mut shares = Shares {
            index: ctx.index,
            parallelism: ctx.parallelism.max(1),
            key_groups: ctx.key_groups.max(1),
            peers: Vec::new(),
            own: None,
        };
        if shares.parallelism == 1 {
            return Ok(shares);
        }
        let peers = ctx.params.get("lazarus.peers").ok_or_else(|| {
            Fatal::new(format!(
                "kv-service with parallelism {} needs one VIP per instance: set vips = [...] (or vips6) with {} addresses on the operator",
                ctx.parallelism, ctx.parallelism
            ))
        })?;
        for p in peers.split(',') {
            shares.peers.push(
                p.trim().parse().map_err(|e| {
                    Fatal::new(format!("kv-service: lazarus.peers entry {p:?}: {e}"))
                })?,
            );
        }
        if shares.peers.len() != shares.parallelism as usize {
            return Err(Fatal::new(format!(
                "kv-service with parallelism {} needs one VIP per instance, the operator names {}",
                ctx.parallelism,
                shares.peers.len()
            ))
            .into());
        }
        shares.own = Some(shares.peers[shares.index as usize]);
        Ok(shares)
    }

    /// The instance that owns `key`.
    pub fn owner(&self, key: &str) -> u32 {
        group_owner(
            key_group(key.as_bytes(), self.key_groups),
            self.key_groups,
            self.parallelism,
        )
    }

    /// Whether this instance owns `key`.
    pub fn owns(&self, key: &str) -> bool {
        self.owner(key) == self.index
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl KvService {
    /// The service on the port (parameter `lazarus.port`, set from the
    /// operator's `port`, or `port`), which it binds at its first poll on
    /// all addresses, so it serves whatever VIP the agent adds to this
    /// host (active-active: its own VIP).
    pub fn new(ctx: &Context) -> Result<KvService, BoxError> {
        let shares = Shares::from_context(ctx)?;
        let port: u16 = ctx
            .params
            .get("lazarus.port")
            .or_else(|| ctx.params.get("port"))
            .ok_or("kv-service needs a port: set `port` on the operator")?
            .parse()
            .map_err(|e| format!("kv-service port: {e}"))?;
        let (tx, rx) = mpsc::channel(QUEUE);
        Ok(KvService {
            state: KeyedState::new("kv", ctx),
            requests: rx,
            unsnapped: Vec::new(),
            staged: VecDeque::new(),
            dirty: HashMap::new(),
            shares,
            listener: Listener::Unbound {
                port,
                requests: tx,
                since: None,
            },
        })
    }

    /// Binds and starts serving, once; `false` while the port is still
    /// held by the instance this one replaces (retried for [`BIND_WAIT`]).
    fn listen(&mut self) -> Result<bool, BoxError> {
        let Listener::Unbound {
            port,
            requests,
            since,
        } = &mut self.listener
        else {
            return Ok(true);
        };
        let port = *port;
        let bound = match &self.shares.own {
            Some(vip) => bind_vip(*vip, port),
            None => bind(port),
        };
        match bound {
            Ok(listener) => {
                let server =
                    tokio::spawn(serve(listener, requests.clone(), self.shares.clone(), port));
                self.listener = Listener::Serving {
                    _server: AbortOnDrop(server),
                };
                Ok(true)
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && since.get_or_insert_with(std::time::Instant::now).elapsed() < BIND_WAIT =>
            {
                Ok(false)
            }
            Err(e) => Err(match &self.shares.own {
                Some(vip) => format!("kv-service: binding its VIP {vip} port {port}: {e}"),
                None => format!("kv-service: binding port {port}: {e}"),
            }
            .into()),
        }
    }

    /// Applies one request; the answer is sent now or held for a commit.
    fn apply(&mut self, req: Request) {
        let key = req.op.key();
        if !self.shares.owns(key) {
            // The listener forwards these; one here was misrouted.
            let owner = self.shares.owner(key);
            let _ = req.reply.send(Response::text(
                421,
                format!("key {key:?} belongs to instance {owner}\n"),
            ));
            return;
        }
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
        if !self.listen()? {
            return Ok(SourcePoll::Idle);
        }
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
fn bind(port: u16) -> std::io::Result<TcpListener> {
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
    match try_bind(v6) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(e),
        Err(_) => try_bind(SocketAddr::from(([0, 0, 0, 0], port))),
        ok => ok,
    }
}

/// Binds this instance's own VIP (active-active), with `IP_FREEBIND`: the
/// agent may add the address only after the worker starts, and after a
/// failover two instances may share a host, each on its own address.
fn bind_vip(ip: std::net::IpAddr, port: u16) -> std::io::Result<TcpListener> {
    let addr = SocketAddr::new(ip, port);
    (|| -> std::io::Result<TcpListener> {
        let socket = if ip.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        freebind(&socket, ip.is_ipv4())?;
        socket.bind(addr)?;
        socket.listen(1024)
    })()
}

fn freebind(socket: &tokio::net::TcpSocket, v4: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    let (level, option) = if v4 {
        (libc::SOL_IP, libc::IP_FREEBIND)
    } else {
        (libc::SOL_IPV6, libc::IPV6_FREEBIND)
    };
    // SAFETY: a valid socket descriptor, an int option and its length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            std::ptr::addr_of!(one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

async fn serve(listener: TcpListener, requests: mpsc::Sender<Request>, shares: Shares, port: u16) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let requests = requests.clone();
        let forwarder = Forwarder::new(shares.clone(), port);
        tokio::spawn(async move {
            let _ = connection(stream, requests, forwarder).await;
        });
    }
}

/// Requests for keys this instance does not own go to the owner's VIP, on
/// one kept-alive connection per owner (per client connection, so answers
/// come back in the client's order).
struct Forwarder {
    shares: Shares,
    port: u16,
    conns: HashMap<u32, (TcpStream, Vec<u8>)>,
}

impl Forwarder {
    fn new(shares: Shares, port: u16) -> Forwarder {
        Forwarder {
            shares,
            port,
            conns: HashMap::new(),
        }
    }

    /// The owner's answer, or 503 if it cannot be reached (a client
    /// retries, as after any failover). A request is sent again only when
    /// a kept-alive connection turned out closed before any answer byte.
    async fn forward(&mut self, owner: u32, method: &str, path: &str, body: &[u8]) -> Response {
        let peer = SocketAddr::new(self.shares.peers[owner as usize], self.port);
        for _ in 0..2 {
            let reused = self.conns.contains_key(&owner);
            if !reused {
                let connect = tokio::time::timeout(
                    std::time::Duration::from_secs(1),
                    TcpStream::connect(peer),
                );
                match connect.await {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        self.conns.insert(owner, (s, Vec::new()));
                    }
                    _ => break,
                }
            }
            let (stream, buf) = self.conns.get_mut(&owner).expect("inserted above");
            match tokio::time::timeout(FORWARD_TIMEOUT, exchange(stream, buf, method, path, body))
                .await
            {
                Ok(Ok((r, keep))) => {
                    if !keep {
                        self.conns.remove(&owner);
                    }
                    return r;
                }
                Ok(Err(Exchange::ClosedBeforeAnswer)) if reused => {
                    self.conns.remove(&owner);
                }
                _ => {
                    self.conns.remove(&owner);
                    break;
                }
            }
        }
        Response::text(
            503,
            format!("instance {owner} (owner of the key, at {peer}) is unavailable; retry\n"),
        )
    }
}

enum Exchange {
    ClosedBeforeAnswer,
    Failed,
}

/// One request on a connection to an owner; the answer and whether the
/// connection stays open.
async fn exchange(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(Response, bool), Exchange> {
    let mut out = format!(
        "{method} {path} HTTP/1.1\r\nHost: lazarus\r\nContent-Length: {}\r\n{FORWARDED}: 1\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    stream
        .write_all(&out)
        .await
        .map_err(|_| Exchange::ClosedBeforeAnswer)?;
    let head_len = loop {
        if let Some(pos) = find(buf, b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(Exchange::Failed);
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) if buf.is_empty() => return Err(Exchange::ClosedBeforeAnswer),
            Ok(0) | Err(_) => return Err(Exchange::Failed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or(Exchange::Failed)?;
    let mut length = 0usize;
    let mut keep = true;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().map_err(|_| Exchange::Failed)?,
                "connection" => keep = !value.trim().eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
    }
    if length > MAX_VALUE + MAX_HEAD {
        return Err(Exchange::Failed);
    }
    while buf.len() < head_len + length {
        let mut chunk = vec![0u8; (head_len + length - buf.len()).min(64 << 10)];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(Exchange::Failed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf[head_len..head_len + length].to_vec();
    buf.drain(..head_len + length);
    Ok((Response { status, body }, keep))
}

/// One client connection: HTTP/1.1 requests in order, keep-alive.
async fn connection(
    mut stream: TcpStream,
    requests: mpsc::Sender<Request>,
    mut forwarder: Forwarder,
) -> std::io::Result<()> {
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
            Ok(Some(op)) if !forwarder.shares.owns(op.key()) => {
                let owner = forwarder.shares.owner(op.key());
                if parsed.forwarded {
                    Response::text(
                        421,
                        format!(
                            "key {:?} belongs to instance {owner}, not this one (forwarded here)\n",
                            op.key()
                        ),
                    )
                } else {
                    let body = match &op {
                        Op::Put(_, v) => v.as_slice(),
                        _ => &[],
                    };
                    forwarder
                        .forward(owner, &parsed.method, &parsed.path, body)
                        .await
                }
            }
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
    /// Sent by another instance (never forwarded again).
    forwarded: bool,
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
    let mut forwarded = false;
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
            FORWARDED => forwarded = true,
            _ => {}
        }
    }
    Ok(Head {
        method: method.to_string(),
        path: path.to_string(),
        content_length,
        close,
        forwarded,
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
        421 => "Misdirected Request",
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

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    fn active_active(index: u32, port: u16) -> Context {
        let mut ctx = Context::for_test("kv", index, 2);
        ctx.params.insert("port".into(), port.to_string());
        ctx.params
            .insert("lazarus.peers".into(), "127.0.0.1,127.0.0.2".into());
        ctx
    }

    #[test]
    fn test_active_active_needs_one_vip_per_instance() {
        let mut ctx = Context::for_test("kv", 0, 2);
        ctx.params.insert("port".into(), "0".into());
        let e = KvService::new(&ctx).err().expect("no peers").to_string();
        assert!(e.contains("needs one VIP per instance: set vips"), "{e}");
        ctx.params
            .insert("lazarus.peers".into(), "127.0.0.1".into());
        let e = KvService::new(&ctx).err().expect("one peer").to_string();
        assert!(e.contains("the operator names 1"), "{e}");
        ctx.params
            .insert("lazarus.peers".into(), "127.0.0.1,nope".into());
        let e = KvService::new(&ctx).err().expect("bad peer").to_string();
        assert!(e.contains("lazarus.peers entry \"nope\""), "{e}");
    }

    /// Two instances on loopback addresses (127.0.0.1 and 127.0.0.2, the
    /// same port): each key is answered through either address, writes are
    /// acknowledged only after the owner's checkpoint commits, and a
    /// forwarded request that reaches a non-owner is refused, not looped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_any_instance_answers_for_any_key_by_forwarding() {
        let port = free_port();
        let mut a = KvService::new(&active_active(0, port)).expect("instance 0");
        let mut b = KvService::new(&active_active(1, port)).expect("instance 1");
        // The first poll binds the listeners.
        for kv in [&mut a, &mut b] {
            assert_eq!(
                kv.poll(&mut Emitter::default(), 1).expect("bind"),
                SourcePoll::Idle
            );
        }
        // The state loops: apply requests, checkpoint and commit every 20 ms.
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let driver = tokio::spawn(async move {
            let mut out = Emitter::default();
            let mut n = 0u64;
            loop {
                for kv in [&mut a, &mut b] {
                    kv.poll(&mut out, 64).expect("poll");
                }
                n += 1;
                if n % 20 == 0 {
                    let id = CheckpointId(n / 20);
                    for kv in [&mut a, &mut b] {
                        kv.prepare_snapshot(id);
                        let _ = kv.snapshot();
                        kv.committed(id).expect("commit");
                    }
                }
                if stop_rx.try_recv().is_ok() {
                    return (a, b);
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        });
        let shares = Shares::from_context(&active_active(0, port)).expect("shares");
        let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
        assert!(
            keys.iter().any(|k| shares.owner(k) == 0) && keys.iter().any(|k| shares.owner(k) == 1)
        );
        let request = |ip: &'static str,
                       method: &'static str,
                       path: String,
                       body: Vec<u8>,
                       extra: &'static str| {
            let addr: SocketAddr = format!("{ip}:{port}").parse().expect("addr");
            let extra = extra.to_string();
            async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                let mut req = format!(
                    "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
                    body.len()
                )
                .into_bytes();
                req.extend_from_slice(&body);
                s.write_all(&req).await.expect("write");
                let mut reply = Vec::new();
                s.read_to_end(&mut reply).await.expect("read");
                let text = String::from_utf8_lossy(&reply).to_string();
                let status: u16 = text[9..12].parse().expect("status");
                let body = text
                    .split_once("\r\n\r\n")
                    .map(|(_, b)| b.to_string())
                    .unwrap_or_default();
                (status, body)
            }
        };
        // Writes through the "wrong" address too: all acknowledged.
        for (i, k) in keys.iter().enumerate() {
            let ip = if i % 2 == 0 { "127.0.0.1" } else { "127.0.0.2" };
            let (status, body) = request(
                ip,
                "PUT",
                format!("/kv/{k}"),
                format!("v-{k}").into_bytes(),
                "",
            )
            .await;
            assert_eq!(status, 201, "PUT {k} via {ip}: {body}");
        }
        // Every key reads back through both addresses.
        for k in &keys {
            for ip in ["127.0.0.1", "127.0.0.2"] {
                let (status, body) = request(ip, "GET", format!("/kv/{k}"), vec![], "").await;
                assert_eq!(
                    (status, body.as_str()),
                    (200, format!("v-{k}").as_str()),
                    "GET {k} via {ip}"
                );
            }
        }
        // A forwarded request at a non-owner: refused, not sent round again.
        let k = keys
            .iter()
            .find(|k| shares.owner(k) == 1)
            .expect("a key of 1");
        let (status, body) = request(
            "127.0.0.1",
            "GET",
            format!("/kv/{k}"),
            vec![],
            "X-Lazarus-Forwarded: 1\r\n",
        )
        .await;
        assert_eq!(status, 421, "{body}");
        assert!(body.contains("belongs to instance 1"), "{body}");
        let _ = stop_tx.send(());
        let (a, b) = driver.await.expect("driver");
        // Each instance holds exactly its own share.
        assert_eq!(a.state.len() + b.state.len(), keys.len());
        assert_eq!(
            a.state.len(),
            keys.iter().filter(|k| shares.owner(k) == 0).count()
        );
    }

    /// A listener holding a free port, and a service configured for it.
    fn service_on_a_held_port() -> (TcpListener, u16, KvService) {
        let holder = bind(0).expect("a port");
        let port = holder.local_addr().expect("addr").port();
        let mut ctx = Context::for_test("kv", 0, 1);
        ctx.params.insert("port".into(), port.to_string());
        (holder, port, KvService::new(&ctx).expect("service"))
    }

    /// A rolled-back instance's first polls wait while the instance it
    /// replaces still holds the port, then bind it and serve.
    #[tokio::test]
    async fn test_the_first_poll_waits_for_a_port_still_held_then_binds_it() {
        let (holder, port, mut kv) = service_on_a_held_port();
        let mut out = Emitter::default();
        for _ in 0..3 {
            let poll = kv.poll(&mut out, 16).expect("a held port is waited for");
            assert!(matches!(poll, SourcePoll::Idle));
        }
        assert!(
            matches!(kv.listener, Listener::Unbound { since: Some(_), .. }),
            "still waiting for the port"
        );
        drop(holder);
        kv.poll(&mut out, 16).expect("binds once it is free");
        assert!(matches!(kv.listener, Listener::Serving { .. }));
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("it serves the port");
        conn.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("request");
        let mut answer = vec![0; 12];
        conn.read_exact(&mut answer).await.expect("answer");
        assert_eq!(
            &answer,
            b"HTTP/1.1 200",
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }

    /// A port still held after the bind wait is an error that names it,
    /// not a wait for ever.
    #[tokio::test]
    async fn test_a_port_held_past_the_bind_wait_is_an_error_naming_it() {
        let (holder, port, mut kv) = service_on_a_held_port();
        let mut out = Emitter::default();
        kv.poll(&mut out, 16).expect("waits at first");
        if let Listener::Unbound { since, .. } = &mut kv.listener {
            *since = std::time::Instant::now()
                .checked_sub(BIND_WAIT + std::time::Duration::from_millis(1));
        }
        let e = kv.poll(&mut out, 16).expect_err("gives up").to_string();
        assert!(e.contains(&format!("binding port {port}")), "{e}");
        drop(holder);
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
