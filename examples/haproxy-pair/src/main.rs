//! `employees-api`: a small, stateless JSON-over-HTTP API whose data is in
//! PostgreSQL. It knows nothing of Lazarus: the example runs three of it as
//! `process` operators behind an HAProxy pair.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /employees` | 200, every employee, by id |
//! | `GET /employees/{id}` | 200 the employee, 404 |
//! | `POST /employees` `{"name","title","salary"}` | 201 the employee with its id |
//! | `PUT /employees/{id}` `{"name","title","salary"}` | 200, 404 |
//! | `DELETE /employees/{id}` | 204, 404 |
//! | `GET /health` | 200 when the database answers, else 503 |
//!
//! Bad input (unknown path, bad id, bad JSON, a body over 64 KiB) gets a
//! 4xx with a JSON error naming what is wrong. Every answer says which
//! instance served it (`X-Served-By`, from `EMPLOYEES_NAME`).
//!
//! Settings (environment): `EMPLOYEES_DB` (a libpq connection string,
//! required), `EMPLOYEES_LISTEN` (default `0.0.0.0:8000`), `EMPLOYEES_NAME`.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

const MAX_HEAD: usize = 16 << 10;
const MAX_BODY: usize = 64 << 10;

#[derive(Debug, Serialize)]
struct Employee {
    id: i64,
    name: String,
    title: String,
    salary: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewEmployee {
    name: String,
    title: String,
    salary: i64,
}

struct Db {
    url: String,
    client: Mutex<Option<Arc<tokio_postgres::Client>>>,
}

impl Db {
    /// The connection, opened (again) when there is none or it broke.
    async fn client(&self) -> Result<Arc<tokio_postgres::Client>, String> {
        let mut c = self.client.lock().await;
        if let Some(client) = c.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        let (client, conn) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_postgres::connect(&self.url, tokio_postgres::NoTls),
        )
        .await
        .map_err(|_| "database connect timed out".to_string())?
        .map_err(|e| format!("database: {e}"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("employees-api: database connection ended: {e}");
            }
        });
        let client = Arc::new(client);
        *c = Some(client.clone());
        Ok(client)
    }
}

struct Reply {
    status: u16,
    body: serde_json::Value,
}

fn reply(status: u16, body: serde_json::Value) -> Reply {
    Reply { status, body }
}

fn error(status: u16, message: impl Into<String>) -> Reply {
    reply(status, serde_json::json!({ "error": message.into() }))
}

fn row(r: &tokio_postgres::Row) -> Employee {
    Employee {
        id: r.get(0),
        name: r.get(1),
        title: r.get(2),
        salary: r.get(3),
    }
}

async fn handle(db: &Db, method: &str, path: &str, body: &[u8]) -> Reply {
    let client = match db.client().await {
        Ok(c) => c,
        Err(e) => return error(503, e),
    };
    let id = path
        .strip_prefix("/employees/")
        .map(|s| s.parse::<i64>().map_err(|_| s.to_string()));
    let parse = |body: &[u8]| -> Result<NewEmployee, Reply> {
        let e: NewEmployee =
            serde_json::from_slice(body).map_err(|e| error(400, format!("body: {e}")))?;
        if e.name.trim().is_empty() || e.name.len() > 200 || e.title.len() > 200 {
            return Err(error(400, "name must be 1..200 bytes, title at most 200"));
        }
        Ok(e)
    };
    let result = match (method, path, id) {
        ("GET", "/health", _) => client
            .simple_query("SELECT 1")
            .await
            .map(|_| reply(200, serde_json::json!({ "status": "ok" }))),
        ("GET", "/employees", _) => client
            .query("SELECT id, name, title, salary FROM employees ORDER BY id", &[])
            .await
            .map(|rows| {
                let all: Vec<Employee> = rows.iter().map(row).collect();
                reply(200, serde_json::to_value(all).unwrap_or_default())
            }),
        ("POST", "/employees", _) => match parse(body) {
            Err(r) => return r,
            Ok(e) => client
                .query_one(
                    "INSERT INTO employees (name, title, salary) VALUES ($1, $2, $3) RETURNING id, name, title, salary",
                    &[&e.name, &e.title, &e.salary],
                )
                .await
                .map(|r| reply(201, serde_json::to_value(row(&r)).unwrap_or_default())),
        },
        (_, _, Some(Err(bad))) => return error(400, format!("{bad:?} is not an employee id")),
        ("GET", _, Some(Ok(id))) => client
            .query_opt("SELECT id, name, title, salary FROM employees WHERE id = $1", &[&id])
            .await
            .map(|r| match r {
                Some(r) => reply(200, serde_json::to_value(row(&r)).unwrap_or_default()),
                None => error(404, format!("no employee {id}")),
            }),
        ("PUT", _, Some(Ok(id))) => match parse(body) {
            Err(r) => return r,
            Ok(e) => client
                .query_opt(
                    "UPDATE employees SET name = $2, title = $3, salary = $4 WHERE id = $1 RETURNING id, name, title, salary",
                    &[&id, &e.name, &e.title, &e.salary],
                )
                .await
                .map(|r| match r {
                    Some(r) => reply(200, serde_json::to_value(row(&r)).unwrap_or_default()),
                    None => error(404, format!("no employee {id}")),
                }),
        },
        ("DELETE", _, Some(Ok(id))) => client
            .execute("DELETE FROM employees WHERE id = $1", &[&id])
            .await
            .map(|n| {
                if n == 1 {
                    reply(204, serde_json::Value::Null)
                } else {
                    error(404, format!("no employee {id}"))
                }
            }),
        (m, p, _) => return error(404, format!("no route {m} {p}")),
    };
    result.unwrap_or_else(|e| error(503, format!("database: {e}")))
}

async fn serve(mut s: TcpStream, db: Arc<Db>, name: Arc<String>) {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return;
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let r = if length > MAX_BODY {
        error(413, format!("body over {MAX_BODY} bytes"))
    } else {
        let mut body = buf[head_end..].to_vec();
        while body.len() < length {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                Ok(Ok(n)) => body.extend_from_slice(&chunk[..n]),
            }
        }
        body.truncate(length);
        handle(&db, method, path, &body).await
    };
    let text = if r.body.is_null() {
        String::new()
    } else {
        r.body.to_string()
    };
    let reason = match r.status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        413 => "Payload Too Large",
        _ => "Service Unavailable",
    };
    let out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Served-By: {name}\r\nConnection: close\r\n\r\n{text}",
        r.status,
        text.len()
    );
    let _ = s.write_all(out.as_bytes()).await;
    let _ = s.shutdown().await;
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let Ok(url) = std::env::var("EMPLOYEES_DB") else {
        eprintln!("employees-api: set EMPLOYEES_DB to a PostgreSQL connection string (host=... user=... dbname=...)");
        return std::process::ExitCode::from(2);
    };
    let listen = std::env::var("EMPLOYEES_LISTEN").unwrap_or_else(|_| "0.0.0.0:8000".into());
    let name = Arc::new(std::env::var("EMPLOYEES_NAME").unwrap_or_else(|_| "employees-api".into()));
    let db = Arc::new(Db {
        url,
        client: Mutex::new(None),
    });
    // The table, once (three instances may race: retried).
    for attempt in 0.. {
        let created = match db.client().await {
            Ok(c) => c
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS employees (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL, title TEXT NOT NULL, salary BIGINT NOT NULL)",
                )
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match created {
            Ok(()) => break,
            Err(e) if attempt < 50 => {
                eprintln!("employees-api: preparing the table: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                eprintln!("employees-api: preparing the table: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let listener = match TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("employees-api: cannot listen on {listen}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    eprintln!("employees-api {name}: listening on {listen}");
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(serve(s, db.clone(), name.clone()));
            }
            Err(e) => {
                eprintln!("employees-api: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
