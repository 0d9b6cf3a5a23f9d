//! partd's HTTP/JSON API on a Unix socket (resources/api/partd.openapi.yaml).
//!
//! Every connection's peer uid (SO_PEERCRED) is checked against root,
//! partd's own uid and the allowlist; others get 403. Bodies are parsed by
//! partd itself so every malformed request gets a 4xx with a JSON message.

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, MethodRouter};
use axum::{Extension, Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::net::{UnixListener, UnixStream};
use tower::ServiceExt;

use partvisor_api::definition::MAX_STOP_TIMEOUT_S;
use partvisor_api::views::{ErrorBody, LogQuery, StartBody, StopBody};

use crate::access::Caller;
use crate::coordinator::{CoordError, Coordinator};

/// The peer of one API connection.
#[derive(Clone, Debug)]
pub struct Peer {
    /// uid, gid and supplementary groups at connect time (SO_PEERCRED and
    /// SO_PEERGROUPS); `None` when the kernel would not say (never on
    /// Linux).
    pub caller: Option<Caller>,
    pub pid: Option<i32>,
}

impl Peer {
    /// The credentials of a connected stream.
    fn of(stream: &UnixStream) -> Peer {
        match stream.peer_cred() {
            Ok(c) => Peer {
                caller: peer_groups(stream.as_raw_fd()).ok().map(|groups| Caller {
                    uid: c.uid(),
                    gid: c.gid(),
                    groups,
                }),
                pid: c.pid(),
            },
            Err(_) => Peer {
                caller: None,
                pid: None,
            },
        }
    }

    fn uid(&self) -> Option<u32> {
        self.caller.as_ref().map(|c| c.uid)
    }
}

/// `SO_PEERGROUPS` (Linux 4.13; `asm-generic/socket.h`), which the libc
/// crate does not export for this target.
const SO_PEERGROUPS: libc::c_int = 59;

/// The supplementary groups the peer of `fd` had when it connected.
fn peer_groups(fd: std::os::fd::RawFd) -> std::io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `groups`,
        // whose size `len` gives, and updates `len`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        // ERANGE: `len` says how much it needs.
        if e.raw_os_error() == Some(libc::ERANGE) && n > groups.len() {
            groups.resize(n, 0);
            continue;
        }
        return Err(e);
    }
}

/// Limits that keep a slow or hostile client from holding partd's
/// connections or memory.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time to send the request head, and separately the body.
    pub request_timeout: Duration,
    /// Largest request body.
    pub max_body: usize,
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `shutdown` completes. Each connection
/// is HTTP/1.1 with a head timeout; its peer credentials are attached to
/// every request; bodies are read whole (bounded in size and time) before
/// the router sees them, so handlers never wait on a slow client.
pub async fn serve(
    listener: UnixListener,
    app: Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("API socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(
                "API socket: {} connections open; refusing another",
                limits.max_connections
            );
            continue;
        };
        let peer = Peer::of(&stream);
        let app = app.clone();
        tokio::spawn(async move {
            let each = peer.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (app, peer) = (app.clone(), each.clone());
                async move { Ok::<_, Infallible>(handle(app, peer, limits, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.request_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!("API connection from {peer:?} ended: {e}");
            }
            drop(slot);
        });
    }
}

async fn handle(app: Router, peer: Peer, limits: Limits, req: Request<Incoming>) -> Response {
    let (mut parts, body) = req.into_parts();
    parts.extensions.insert(peer);
    let limited = Limited::new(body, limits.max_body);
    let bytes = match tokio::time::timeout(limits.request_timeout, limited.collect()).await {
        Err(_) => {
            return ApiError(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request body not received within {} ms",
                    limits.request_timeout.as_millis()
                ),
            )
            .into_response()
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {} bytes", limits.max_body),
            )
            .into_response()
        }
        Ok(Err(e)) => {
            return bad_request(format!("cannot read the request body: {e}")).into_response()
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    let req = Request::from_parts(parts, axum::body::Body::from(bytes));
    match app.oneshot(req).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    }
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct Api {
    pub coord: Arc<Coordinator>,
    /// uids served: root, partd's own uid and the configured allowlist.
    pub allowed: Arc<BTreeSet<u32>>,
}

/// An error reply: `{"error": "..."}` with a status.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<CoordError> for ApiError {
    fn from(e: CoordError) -> Self {
        ApiError(e.status(), e.to_string())
    }
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// Parses a JSON body strictly (unknown fields are refused by the types).
fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes, empty_ok: bool) -> Result<T, ApiError> {
    if body.is_empty() && empty_ok {
        return serde_json::from_str("{}").map_err(|e| bad_request(format!("request body: {e}")));
    }
    serde_json::from_slice(body).map_err(|e| bad_request(format!("request body is not valid: {e}")))
}

async fn check_peer(State(api): State<Api>, req: axum::extract::Request, next: Next) -> Response {
    let peer = req.extensions().get::<Peer>().cloned();
    match peer.as_ref().and_then(Peer::uid) {
        Some(uid) if api.allowed.contains(&uid) => next.run(req).await,
        Some(uid) => {
            tracing::warn!(
                "refused API request from uid {uid} (pid {:?}): not root, partd's uid or allowlisted",
                peer.and_then(|p| p.pid)
            );
            ApiError(
                StatusCode::FORBIDDEN,
                format!("uid {uid} may not use partd; ask an administrator to add it with partd --allow-uid {uid}"),
            )
            .into_response()
        }
        None => ApiError(
            StatusCode::FORBIDDEN,
            "cannot identify the connecting user".into(),
        )
        .into_response(),
    }
}

/// One route: HTTP method (lower case, as the OpenAPI document spells it),
/// path (with `{name}` parameters, as in the document) and its handler.
type Route = (&'static str, &'static str, MethodRouter<Api>);

/// Every route partd serves. The router is built from this table alone, so
/// the test that compares it with `resources/api/partd.openapi.yaml` sees
/// exactly what is served.
fn routes() -> Vec<Route> {
    vec![
        ("get", "/v1/partitions", get(list)),
        ("post", "/v1/partitions", post(create)),
        ("get", "/v1/partitions/{name}", get(show)),
        ("delete", "/v1/partitions/{name}", delete(destroy)),
        ("post", "/v1/partitions/{name}/start", post(start)),
        ("post", "/v1/partitions/{name}/stop", post(stop)),
        ("get", "/v1/partitions/{name}/console", get(console)),
        ("get", "/v1/resources", get(resources)),
        ("get", "/v1/log", get(log)),
    ]
}

/// The API's routes.
pub fn router(api: Api) -> Router {
    let mut router = Router::new();
    for (_, path, handler) in routes() {
        router = router.route(path, handler);
    }
    router
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "no such API path; see resources/api/partd.openapi.yaml".into(),
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            api.clone(),
            check_peer,
        ))
        .with_state(api)
}

async fn list(State(api): State<Api>) -> Result<Response, ApiError> {
    Ok(Json(api.coord.list()?).into_response())
}

/// The caller of a request (check_peer let it through, so it is known).
fn caller(peer: &Peer) -> Result<&Caller, ApiError> {
    peer.caller.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::FORBIDDEN,
            "cannot identify the connecting user".into(),
        )
    })
}

async fn create(
    State(api): State<Api>,
    Extension(peer): Extension<Peer>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let value: serde_json::Value = parse_body(&body, false)?;
    if !value.is_object() {
        return Err(bad_request(
            "request body must be a JSON object (a partition definition)",
        ));
    }
    let view = api.coord.create(value, caller(&peer)?).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn show(State(api): State<Api>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let id = Coordinator::parse_id(&name)?;
    Ok(Json(api.coord.view(&id)?).into_response())
}

async fn destroy(
    State(api): State<Api>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let id = Coordinator::parse_id(&name)?;
    api.coord.destroy(&id, caller(&peer)?).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn start(
    State(api): State<Api>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = Coordinator::parse_id(&name)?;
    let _: StartBody = parse_body(&body, true)?;
    Ok(Json(api.coord.start(&id, caller(&peer)?).await?).into_response())
}

async fn stop(
    State(api): State<Api>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = Coordinator::parse_id(&name)?;
    let b: StopBody = parse_body(&body, true)?;
    if b.timeout_s.is_some_and(|t| t > MAX_STOP_TIMEOUT_S) {
        return Err(bad_request(format!(
            "timeout_s: at most {MAX_STOP_TIMEOUT_S}"
        )));
    }
    let view = api
        .coord
        .stop(
            &id,
            caller(&peer)?,
            b.force,
            b.timeout_s.map(Duration::from_secs),
        )
        .await?;
    Ok(Json(view).into_response())
}

async fn resources(State(api): State<Api>) -> Result<Response, ApiError> {
    Ok(Json(api.coord.free()?).into_response())
}

async fn log(State(api): State<Api>, Query(q): Query<LogQuery>) -> Result<Response, ApiError> {
    let id = match &q.partition {
        Some(p) => Some(Coordinator::parse_id(p)?),
        None => None,
    };
    let entries = api.coord.log(id.as_ref(), q.limit.unwrap_or(100))?;
    Ok(Json(entries).into_response())
}

/// The protocol name of a console connection (HTTP/1.1 upgrade).
pub const CONSOLE_PROTOCOL: &str = "partvisor-console";

/// `GET /v1/partitions/{name}/console` with `Upgrade: partvisor-console`:
/// after `101 Switching Protocols` the connection carries the partition's
/// serial console both ways (the backlog first), until the guest ends or the
/// client closes. Subject to the same uid check as every other request.
async fn console(
    State(api): State<Api>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
    mut req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let id = Coordinator::parse_id(&name)?;
    let wants = req
        .headers()
        .get(axum::http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(CONSOLE_PROTOCOL));
    if !wants {
        return Err(bad_request(format!(
            "the console is an HTTP/1.1 upgrade: send `Connection: upgrade` and `Upgrade: {CONSOLE_PROTOCOL}` (partctl console does)"
        )));
    }
    api.coord
        .authorize(&id, caller(&peer)?, "attach to the console of")?;
    let view = api.coord.view(&id)?;
    let Some(vmm) = view.vmm else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("{id} has no console: it is not running (`partctl start {id}`)"),
        ));
    };
    let mut guest = UnixStream::connect(&vmm.console_socket)
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::BAD_GATEWAY,
                format!("cannot open {}: {e}", vmm.console_socket.display()),
            )
        })?;
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut guest).await;
            }
            Err(e) => tracing::debug!("{id}: console upgrade failed: {e}"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(axum::http::header::CONNECTION, "upgrade")
        .header(axum::http::header::UPGRADE, CONSOLE_PROTOCOL)
        .body(axum::body::Body::empty())
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = include_str!("../../../resources/api/partd.openapi.yaml");

    /// (method, path) of every operation in an OpenAPI document.
    fn operations(spec: &str) -> BTreeSet<(String, String)> {
        let doc: serde_json::Value = serde_norway::from_str(spec).unwrap();
        let paths = doc["paths"].as_object().expect("the spec has paths");
        let methods = ["get", "put", "post", "delete", "patch", "head", "options"];
        paths
            .iter()
            .flat_map(|(path, item)| {
                let item = item.as_object().expect("a path item is a map");
                item.keys()
                    .filter(|k| methods.contains(&k.as_str()))
                    .map(|m| (m.clone(), path.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn served() -> BTreeSet<(String, String)> {
        routes()
            .into_iter()
            .map(|(m, p, _)| (m.to_owned(), p.to_owned()))
            .collect()
    }

    /// (method, path) pairs.
    type Ops = Vec<(String, String)>;

    /// Names what one side has and the other lacks; empty when they agree.
    fn disagreement(spec: &str) -> (Ops, Ops) {
        let (spec, served) = (operations(spec), served());
        (
            served.difference(&spec).cloned().collect(),
            spec.difference(&served).cloned().collect(),
        )
    }

    #[test]
    fn every_route_partd_serves_is_in_the_openapi_document_and_nothing_else_is() {
        let (undocumented, unserved) = disagreement(SPEC);
        assert!(
            undocumented.is_empty(),
            "served but not in the spec: {undocumented:?}"
        );
        assert!(
            unserved.is_empty(),
            "in the spec but not served: {unserved:?}"
        );
        assert_eq!(served().len(), 9);
    }

    #[test]
    fn a_route_removed_from_the_document_is_reported_as_undocumented() {
        // Drop the `delete:` operation of /v1/partitions/{name} from the spec.
        let mut lines: Vec<&str> = SPEC.lines().collect();
        let at = lines
            .iter()
            .position(|l| *l == "    delete:")
            .expect("the spec documents DELETE");
        let end = lines[at + 1..]
            .iter()
            .position(|l| !l.starts_with("      "))
            .map_or(lines.len(), |n| at + 1 + n);
        lines.drain(at..end);
        let (undocumented, unserved) = disagreement(&lines.join("\n"));
        assert_eq!(
            undocumented,
            vec![("delete".to_owned(), "/v1/partitions/{name}".to_owned())]
        );
        assert!(unserved.is_empty());
    }
}
