//! The HTTP/1.1 listener in front of the router. `axum::serve` has no read timeouts and no
//! connection cap, so a slow or idle client could hold a connection (and its file descriptor)
//! forever. Here each connection gets a header read timeout (which also closes idle
//! keep-alive connections), each request body a read deadline, and connections beyond
//! [`ServeLimits::max_connections`] are answered with an OpenAI-style 503 and closed. On
//! shutdown the listener closes, connections finish their request in flight, and streams
//! still open at the drain deadline end with an error event and `[DONE]`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{ApiError, Phase, ServerState, router};

/// Connection-level limits of [`serve`]. The defaults suit a public endpoint behind a
/// Kubernetes Service.
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// Longest wait for a request's complete header once the server starts reading one,
    /// including the wait for the next request on an idle keep-alive connection. A client
    /// that sends a partial header (or nothing) is disconnected after it. Default 10 s.
    pub header_read_timeout: Duration,
    /// Longest time from the end of a request's header to the end of its body. A body that
    /// is not complete by then is refused with 408. Default 30 s.
    pub body_read_timeout: Duration,
    /// Most connections open at once. Beyond it a connection is answered with 503 and
    /// closed; keep it below the process's open-file limit. Default 4096.
    pub max_connections: usize,
    /// After shutdown starts, how long requests in flight (streams included) may still run.
    /// Streams open at the deadline end with an error event and `[DONE]`; other requests
    /// get a 503. Default 25 s, under Kubernetes' default 30 s termination grace period.
    pub drain_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 4096,
            drain_timeout: Duration::from_secs(25),
        }
    }
}

/// Connections refused for the cap that may still be writing their 503 at once; past this
/// they are closed without an answer, so a flood cannot pile up descriptors in refusals.
const MAX_REFUSALS_IN_FLIGHT: usize = 64;

/// How long a refused connection is kept open after its 503, reading (and discarding) what
/// the client still sends, so closing does not reset the connection before the answer is read.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// After the drain deadline, how long streams get to write their final error event before
/// their connections are closed regardless.
const FINAL_WRITE_GRACE: Duration = Duration::from_secs(2);

/// Serves the API on `listener` until `shutdown` resolves, then drains: the listener closes,
/// `/ready` answers 503, every connection finishes the request it is serving and closes,
/// and streams still open after [`ServeLimits::drain_timeout`] are ended with an error event
/// and `[DONE]`. Returns once every connection is closed.
pub async fn serve<F>(
    listener: TcpListener,
    state: Arc<ServerState>,
    limits: ServeLimits,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let app = router(state.clone());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
    let refusal = refusal_response(limits.max_connections);
    let mut conns = JoinSet::new();
    let phase = state.phase.subscribe();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: back off
                    // briefly instead of spinning on the error.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let _ = stream.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            state.metrics.http_connections_refused.inc();
            if let Ok(permit) = refusals.clone().try_acquire_owned() {
                tracing::debug!(%peer, "connection refused: at the connection limit");
                let refusal = refusal.clone();
                tokio::spawn(async move {
                    refuse(stream, &refusal).await;
                    drop(permit);
                });
            }
            continue;
        };
        let conn = http.serve_connection(
            TokioIo::new(stream),
            Service {
                app: app.clone(),
                body_read_timeout: limits.body_read_timeout,
            },
        );
        let mut phase = phase.clone();
        let open = OpenConnection::new(slot, &state.metrics.http_connections);
        conns.spawn(async move {
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = left_serving(&mut phase) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(open);
        });
    }
    drop(listener);
    tracing::info!(
        connections = conns.len(),
        "shutting down: draining requests in flight"
    );
    state.phase.send_replace(Phase::Draining);
    let drained = tokio::time::timeout(limits.drain_timeout, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = conns.len(),
            "drain deadline reached: ending the remaining streams"
        );
        state.phase.send_replace(Phase::Expired);
        let _ = tokio::time::timeout(FINAL_WRITE_GRACE, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        conns.abort_all();
    }
    Ok(())
}

/// Resolves once shutdown has started. (The watch guard is dropped here, never held while
/// the connection drains: the sender needs it to announce the deadline.)
async fn left_serving(phase: &mut tokio::sync::watch::Receiver<Phase>) {
    let _ = phase.wait_for(|p| *p != Phase::Serving).await;
}

/// A connection's slot under the cap and its count in the gauge, given back however the
/// connection's task ends (finished or aborted).
struct OpenConnection {
    _slot: tokio::sync::OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
}

impl OpenConnection {
    fn new(slot: tokio::sync::OwnedSemaphorePermit, gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        OpenConnection {
            _slot: slot,
            gauge: gauge.clone(),
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The whole answer to a connection over the cap, written before its request is read.
fn refusal_response(limit: usize) -> Bytes {
    let err = ApiError::unavailable(format!(
        "the server has reached its limit of {limit} open connections; retry later"
    ));
    let body = err.body().to_string();
    Bytes::from(format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         retry-after: {}\r\nconnection: close\r\n\r\n{body}",
        body.len(),
        err.retry_after.unwrap_or(1),
    ))
}

async fn refuse(mut stream: TcpStream, response: &[u8]) {
    if stream.write_all(response).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    // Read until the client closes (or the linger ends): closing with unread input would
    // reset the connection, and the client could lose the 503 before reading it.
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        let mut sink = [0u8; 4096];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// The router behind hyper, with each request body under its read deadline.
#[derive(Clone)]
struct Service {
    app: Router,
    body_read_timeout: Duration,
}

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = <Router as tower_service::Service<Request<Body>>>::Future;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let deadline = self.body_read_timeout;
        let req = req.map(|b| Body::new(TimedBody::new(b, deadline)));
        // A Router is always ready: poll_ready has nothing to wait for.
        tower_service::Service::call(&mut self.app.clone(), req)
    }
}

/// The request body did not arrive within [`ServeLimits::body_read_timeout`].
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimeout(pub Duration);

/// A request body that fails with [`BodyTimeout`] once its deadline passes unfinished.
struct TimedBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
}

impl TimedBody {
    fn new(inner: Incoming, limit: Duration) -> Self {
        TimedBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(limit)),
            limit,
        }
    }
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(BodyTimeout(self.limit)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
