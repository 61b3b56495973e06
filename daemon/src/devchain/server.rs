//! The HTTP side of the dev chain: HTTP/1.1 with keep-alive (lightning-block-sync reuses one
//! connection per client), basic auth, JSON-RPC bodies handed to [`super::rpc`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{now_unix_secs, rpc, Shared};

/// Largest request body accepted: room for a batch of large transactions.
const MAX_REQUEST_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Bound on open connections; further ones are closed at once.
const MAX_CONNECTIONS: usize = 256;
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(50);

/// Serves until `shutdown` turns true or its sender is dropped; then every open connection
/// is aborted (dropping the `JoinSet` aborts its tasks).
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if connections.len() >= MAX_CONNECTIONS {
                        tracing::warn!(%peer, "dev chain: too many RPC connections, closing one");
                        continue;
                    }
                    // Answers are small and latency matters more than throughput here.
                    let _ = stream.set_nodelay(true);
                    let shared = Arc::clone(&shared);
                    connections.spawn(async move {
                        let service = service_fn(move |req| handle(Arc::clone(&shared), req));
                        if let Err(e) = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                        {
                            tracing::debug!(%peer, error = %e, "dev chain: RPC connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "dev chain: accept failed");
                    tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::POST {
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "JSON-RPC takes POST requests only"));
    }
    let authorized = req
        .headers()
        .get(AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == shared.auth_header.as_bytes());
    if !authorized {
        let mut response = plain(StatusCode::UNAUTHORIZED, "wrong RPC user or password");
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"jsonrpc\""));
        return Ok(response);
    }
    let body = match Limited::new(req.into_body(), MAX_REQUEST_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return Ok(plain(StatusCode::PAYLOAD_TOO_LARGE, &format!("request body: {e}")));
        }
    };
    let answer = rpc::handle_body(&shared, &body, now_unix_secs());
    // Always HTTP 200, with any error inside the JSON-RPC body. bitcoind uses 500/404, but
    // lightning-block-sync's HTTP client treats every non-2xx status as a failed exchange,
    // waits 100 ms, reconnects and sends the request again before parsing the error — which
    // ldk-node hits on every "not found" (getmempoolentry, getrawtransaction).
    let mut response = Response::new(Full::new(Bytes::from(answer.to_string())));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}
