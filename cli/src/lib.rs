//! # partctl: the partvisor operations console
//!
//! The operator's side of seed 001's command partition
//! (ARCHITECTURE.md lists the seeds): `partctl` turns commands into requests on
//! `partd`'s HTTP/JSON API (Unix socket, `resources/api/partd.openapi.yaml`)
//! and prints tables for people or JSON (`--json`) for scripts. This library
//! holds what the binary and the end-to-end tests share: the socket
//! location rules, the API client and definition loading (TOML, relative
//! paths resolved against the file's folder). The request and reply types
//! are partd's own, from the API crate (`partvisor-api`).
//!
//! What it must never do: change anything itself. Every change goes through
//! partd, the one writer of the resource database; partctl reads no state
//! files and holds no resources.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

pub use partvisor_api::views::{ErrorBody, IoKind, IoView, PartitionView, StartTimings, VmmView};
pub use partvisor_api::{
    control::ExitRecord, Change, FreeCapacity, Holdings, LogEntry, LogRecord, PartitionState,
};

/// Default state dir of a system partd.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/partvisor";

/// Errors of partctl, each saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach partd at {socket}: {source}; is partd running? (start it with `partd --state-dir DIR`, give --socket/PARTD_SOCKET, or use `partctl --dev`)")]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    /// The HTTP exchange broke off (partd closed the connection, or
    /// answered with something that is not HTTP/1.1).
    #[error("talking to partd at {socket}: {source}")]
    Http {
        socket: PathBuf,
        source: hyper::Error,
    },
    /// A request could not be formed; only a name with characters a URI
    /// cannot carry gets here.
    #[error("cannot send {path} to partd: {source}; partition names are lowercase letters, digits and '-'")]
    Request {
        path: String,
        source: hyper::http::Error,
    },
    /// partd answered with a body this partctl does not understand.
    #[error("unexpected reply from partd: {source}; are partd and partctl from the same build?")]
    Reply { source: serde_json::Error },
    /// A value could not be written as JSON (for `--json` or a request).
    #[error("cannot encode {what} as JSON: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
    /// partd refused the request; `message` is its explanation.
    #[error("{message}")]
    Api { status: u16, message: String },
    /// The definition file could not be read.
    #[error("{path}: cannot read: {source}")]
    DefinitionRead {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The definition file is not TOML.
    #[error("{path}: {source}")]
    DefinitionToml {
        path: PathBuf,
        source: toml::de::Error,
    },
    /// partd refused the definition; `message` is its explanation.
    #[error("{path}: {message}")]
    Definition { path: PathBuf, message: String },
    /// A relative path (of a definition or `--kernel`) could not be made
    /// absolute, which only fails when the working directory is gone.
    #[error("cannot resolve {path} against the working directory: {source}")]
    Resolve {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--dev needs $HOME (or $XDG_STATE_HOME) to find its state directory")]
    NoHome,
    #[error("--dev: cannot {what} {path}: {source}")]
    DevFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--dev: cannot start {partd}: {source}; build it with `cargo build -p partd`")]
    DevSpawn {
        partd: PathBuf,
        source: std::io::Error,
    },
    #[error("--dev: partd exited ({status}) before serving; see {log}")]
    DevExited {
        status: std::process::ExitStatus,
        log: PathBuf,
    },
    #[error("--dev: partd did not open {socket} within {secs} s; see {log}")]
    DevTimeout {
        socket: PathBuf,
        secs: u64,
        log: PathBuf,
    },
}

/// The socket to use: `--socket`, else `PARTD_SOCKET`, else the default
/// state dir's.
pub fn resolve_socket(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_owned();
    }
    match std::env::var_os("PARTD_SOCKET") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(DEFAULT_STATE_DIR).join("partd.sock"),
    }
}

/// The newcomer's state dir: `$XDG_STATE_HOME/partvisor` or
/// `$HOME/.local/state/partvisor`.
pub fn dev_state_dir() -> Result<PathBuf, CtlError> {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("partvisor"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or(CtlError::NoHome)?;
    Ok(PathBuf::from(home).join(".local/state/partvisor"))
}

/// Reads a TOML definition and resolves its relative `kernel`/`initrd`
/// and `[[disk]] image` paths against the file's folder; returns it as
/// JSON for partd.
pub fn load_definition(path: &Path) -> Result<serde_json::Value, CtlError> {
    let text = std::fs::read_to_string(path).map_err(|source| CtlError::DefinitionRead {
        path: path.to_owned(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|source| CtlError::DefinitionToml {
        path: path.to_owned(),
        source,
    })?;
    let mut value = serde_json::to_value(&table).map_err(|source| CtlError::Encode {
        what: "the definition",
        source,
    })?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let base = if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    };
    let base = std::path::absolute(&base).map_err(|source| CtlError::Resolve {
        path: base.clone(),
        source,
    })?;
    let resolve = |v: &mut serde_json::Value, key: &str| {
        if let Some(serde_json::Value::String(s)) = v.get(key) {
            let p = Path::new(s);
            if p.is_relative() {
                let joined = base.join(p);
                v[key] = serde_json::Value::String(joined.display().to_string());
            }
        }
    };
    for key in ["kernel", "initrd"] {
        resolve(&mut value, key);
    }
    if let Some(serde_json::Value::Array(disks)) = value.get_mut("disk") {
        for d in disks {
            resolve(d, "image");
        }
    }
    Ok(value)
}

/// A client of one partd socket. Each request uses its own connection.
#[derive(Clone, Debug)]
pub struct Client {
    pub socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            socket: socket.into(),
        }
    }

    fn http_error(&self, source: hyper::Error) -> CtlError {
        CtlError::Http {
            socket: self.socket.clone(),
            source,
        }
    }

    /// Connects to partd's socket and does the HTTP/1.1 handshake; the
    /// caller drives the returned connection.
    async fn handshake(
        &self,
    ) -> Result<
        (
            SendRequest<Full<Bytes>>,
            Connection<TokioIo<tokio::net::UnixStream>, Full<Bytes>>,
        ),
        CtlError,
    > {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| CtlError::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.http_error(e))
    }

    /// The whole body of `resp`.
    async fn read_body(&self, resp: Response<Incoming>) -> Result<Bytes, CtlError> {
        Ok(resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.http_error(e))?
            .to_bytes())
    }

    /// Sends one request; returns the status and the JSON reply (`null` for
    /// an empty body). Does not turn error statuses into errors.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, serde_json::Value), CtlError> {
        let (mut sender, conn) = self.handshake().await?;
        let driver = tokio::spawn(conn);
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|source| CtlError::Encode {
                what: "the request",
                source,
            })?,
            None => Vec::new(),
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "partd")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|source| CtlError::Request {
                path: path.to_owned(),
                source,
            })?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.http_error(e))?;
        let status = resp.status();
        let body = self.read_body(resp).await?;
        driver.abort();
        let value = if body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or_else(|_| {
                serde_json::json!({ "error": String::from_utf8_lossy(&body).trim().to_string() })
            })
        };
        Ok((status, value))
    }

    /// Sends one request and turns an error status into [`CtlError::Api`].
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, CtlError> {
        let (status, value) = self.raw(method, path, body).await?;
        if status.is_success() {
            return Ok(value);
        }
        Err(api_error(status, Some(&value)))
    }

    pub async fn list(&self) -> Result<Vec<PartitionView>, CtlError> {
        decode(self.call(Method::GET, "/v1/partitions", None).await?)
    }

    pub async fn show(&self, name: &str) -> Result<PartitionView, CtlError> {
        decode(
            self.call(Method::GET, &format!("/v1/partitions/{name}"), None)
                .await?,
        )
    }

    pub async fn create(&self, definition: &serde_json::Value) -> Result<PartitionView, CtlError> {
        decode(
            self.call(Method::POST, "/v1/partitions", Some(definition))
                .await?,
        )
    }

    pub async fn start(&self, name: &str) -> Result<PartitionView, CtlError> {
        decode(
            self.call(
                Method::POST,
                &format!("/v1/partitions/{name}/start"),
                Some(&serde_json::json!({})),
            )
            .await?,
        )
    }

    pub async fn stop(
        &self,
        name: &str,
        force: bool,
        timeout_s: Option<u64>,
    ) -> Result<PartitionView, CtlError> {
        let mut body = serde_json::json!({ "force": force });
        if let Some(t) = timeout_s {
            body["timeout_s"] = t.into();
        }
        decode(
            self.call(
                Method::POST,
                &format!("/v1/partitions/{name}/stop"),
                Some(&body),
            )
            .await?,
        )
    }

    pub async fn destroy(&self, name: &str) -> Result<(), CtlError> {
        self.call(Method::DELETE, &format!("/v1/partitions/{name}"), None)
            .await
            .map(|_| ())
    }

    /// Opens `name`'s serial console through partd (an HTTP/1.1 upgrade
    /// to `partvisor-console`); the returned stream carries it both ways.
    pub async fn console(&self, name: &str) -> Result<TokioIo<hyper::upgrade::Upgraded>, CtlError> {
        let (mut sender, conn) = self.handshake().await?;
        tokio::spawn(conn.with_upgrades());
        let path = format!("/v1/partitions/{name}/console");
        let req = Request::builder()
            .method(Method::GET)
            .uri(&path)
            .header("host", "partd")
            .header("connection", "upgrade")
            .header("upgrade", "partvisor-console")
            .body(Full::new(Bytes::new()))
            .map_err(|source| CtlError::Request { path, source })?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.http_error(e))?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status();
            let body = self.read_body(resp).await?;
            let value = serde_json::from_slice::<serde_json::Value>(&body).ok();
            return Err(api_error(status, value.as_ref()));
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| self.http_error(e))?;
        Ok(TokioIo::new(upgraded))
    }

    pub async fn resources(&self) -> Result<FreeCapacity, CtlError> {
        decode(self.call(Method::GET, "/v1/resources", None).await?)
    }

    pub async fn log(&self, name: Option<&str>, limit: u64) -> Result<Vec<LogEntry>, CtlError> {
        let path = match name {
            Some(n) => format!("/v1/log?partition={n}&limit={limit}"),
            None => format!("/v1/log?limit={limit}"),
        };
        decode(self.call(Method::GET, &path, None).await?)
    }
}

/// partd's refusal: the reply's `error` text, else the status.
fn api_error(status: StatusCode, reply: Option<&serde_json::Value>) -> CtlError {
    let message = reply
        .and_then(|v| ErrorBody::deserialize(v).ok())
        .map(|b| b.error)
        .unwrap_or_else(|| format!("partd answered {status}"));
    CtlError::Api {
        status: status.as_u16(),
        message,
    }
}

fn decode<T: for<'de> Deserialize<'de>>(v: serde_json::Value) -> Result<T, CtlError> {
    serde_json::from_value(v).map_err(|source| CtlError::Reply { source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_kernel_resolves_against_the_files_folder() {
        let dir = std::env::temp_dir().join(format!("partctl-def-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p.toml");
        std::fs::write(
            &f,
            "name = \"p\"\nmemory_mib = 16\nkernel = \"k.elf\"\ninitrd = \"/abs/i\"\ncpus = [1]\n",
        )
        .unwrap();
        let v = load_definition(&f).unwrap();
        assert_eq!(v["kernel"], dir.join("k.elf").display().to_string());
        assert_eq!(v["initrd"], "/abs/i");
        assert_eq!(v["cpus"], serde_json::json!([1]));
        let f2 = dir.join("d.toml");
        std::fs::write(
            &f2,
            "name = \"p\"\nmemory_mib = 16\nkernel = \"/k\"\n[[disk]]\nimage = \"d.img\"\n[[disk]]\nimage = \"/abs.img\"\n",
        )
        .unwrap();
        let v2 = load_definition(&f2).unwrap();
        assert_eq!(
            v2["disk"][0]["image"],
            dir.join("d.img").display().to_string()
        );
        assert_eq!(v2["disk"][1]["image"], "/abs.img");
        std::fs::write(&f, "name = \n").unwrap();
        let e = load_definition(&f).unwrap_err().to_string();
        assert!(e.starts_with(&f.display().to_string()), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn socket_flag_beats_the_environment_and_the_default() {
        assert_eq!(
            resolve_socket(Some(Path::new("/x.sock"))),
            PathBuf::from("/x.sock")
        );
    }
}
