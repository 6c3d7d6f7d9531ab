//! The plain-HTTP listener that sends clients to the TLS one
//! (`server.http_redirect_listen`), as Pomerium's `http_redirect_addr` and
//! Caddy's automatic redirect do: every request is answered `308 Permanent
//! Redirect` to `https://` + the host it named + the TLS port (left out
//! when 443) + its path and query, and nothing else is served there. 308,
//! not 301: a client re-sends the same method and body.
//!
//! It is public, so it has the main listener's guards, on hyper's HTTP/1.1
//! server: the head must arrive whole within `server.header_read_timeout`,
//! may not exceed `server.max_header_size`, one request per connection
//! (no keep-alive to hold a socket open between requests, no body read),
//! and its connections count against the main listener's
//! `server.max_connections` (one budget of sockets and buffers for the
//! process; past it a connection is closed at once and counted in
//! `gateway_connections_refused_total`), and in `gateway_connections_open`. A request without a usable host is
//! a 400 with a JSON error (hyper answers a head it cannot parse itself).
//! HSTS is not sent: browsers ignore it over plain HTTP (RFC 6797 §8.1).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use hyper::header::{HeaderValue, HOST, LOCATION};
use hyper::http::uri::Authority;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::body::{json_error, Body};
use crate::config::ServerConfig;

/// Serves `listener` until `shutdown` resolves; then accepts no more (a
/// connection still open has one short request to finish, bounded by the
/// header timeout). `slots` are the main listener's connection slots.
pub async fn serve(
    listener: TcpListener,
    https_port: u16,
    settings: &ServerConfig,
    slots: Arc<Semaphore>,
    shutdown: impl Future<Output = ()>,
) {
    let mut http = http1::Builder::new();
    // `max_header_bytes` is 8 KiB to 1 MiB (config), within hyper's range.
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .keep_alive(false)
        .max_buf_size(settings.max_header_bytes);
    let http = Arc::new(http);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most often: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed on the redirect listener");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            metrics::counter!("gateway_connections_refused_total").increment(1);
            tracing::debug!(%peer, "no connection slot: redirect connection closed");
            continue;
        };
        let http = Arc::clone(&http);
        tokio::spawn(async move {
            let _slot = slot;
            // Dropped before the slot: the gauge never shows more than
            // `server.max_connections`.
            let _open = crate::proxy::Open::new(metrics::gauge!("gateway_connections_open"));
            let service = service_fn(move |req| async move { Ok::<_, Infallible>(answer(&req, https_port)) });
            if let Err(e) = http.serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(%peer, error = %e, "redirect connection ended");
            }
        });
    }
}

/// The 308 to the TLS listener, or a 400 when the request names no host
/// the redirect could go to.
fn answer<B>(req: &Request<B>, https_port: u16) -> Response<Body> {
    let response = match location(req, https_port) {
        Some(location) => {
            let mut response = Response::new(Body::empty());
            *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
            response.headers_mut().insert(LOCATION, location);
            response
        }
        None => json_error(StatusCode::BAD_REQUEST, "invalid_request", "a request needs a host to be redirected"),
    };
    let status = response.status();
    metrics::counter!("gateway_http_redirects_total", "status" => if status.is_redirection() { "308" } else { "400" })
        .increment(1);
    response
}

/// `https://host[:port]/path?query`: the host from the request's absolute
/// form (RFC 9112 §3.2.2) or else its one `Host` field, with no userinfo
/// (`Host: a@evil.example` is refused, not followed), its port replaced by
/// the TLS listener's. `None` for an `OPTIONS *`, an authority-form target
/// (`CONNECT`'s) or no usable host.
fn location<B>(req: &Request<B>, https_port: u16) -> Option<HeaderValue> {
    let uri = req.uri();
    if uri.path() == "*" || (uri.scheme().is_none() && uri.authority().is_some()) {
        return None;
    }
    let authority = match uri.authority() {
        Some(authority) => authority.clone(),
        None => {
            let mut hosts = req.headers().get_all(HOST).iter();
            match (hosts.next(), hosts.next()) {
                (Some(host), None) => Authority::try_from(host.as_bytes()).ok()?,
                _ => return None,
            }
        }
    };
    let host = authority.host();
    if host.is_empty() || authority.as_str().contains('@') {
        return None;
    }
    let path = match uri.path() {
        "" => "/",
        path => path,
    };
    let query = uri.query().map_or(String::new(), |q| format!("?{q}"));
    let location = match https_port {
        443 => format!("https://{host}{path}{query}"),
        port => format!("https://{host}:{port}{path}{query}"),
    };
    HeaderValue::try_from(location).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(target: &str, host: Option<&str>, port: u16) -> Option<String> {
        let mut req = Request::builder().uri(target);
        if let Some(host) = host {
            req = req.header(HOST, host);
        }
        let req = req.body(()).expect("a request");
        location(&req, port).map(|l| l.to_str().expect("ASCII").to_owned())
    }

    #[test]
    fn the_host_and_target_go_to_the_tls_port() {
        let host = Some("api.example.com");
        assert_eq!(to("/a/b?c=1&d", host, 443).as_deref(), Some("https://api.example.com/a/b?c=1&d"));
        assert_eq!(to("/", host, 8443).as_deref(), Some("https://api.example.com:8443/"));
        assert_eq!(to("/x", Some("api.example.com:80"), 443).as_deref(), Some("https://api.example.com/x"));
        assert_eq!(to("/x", Some("[::1]:8080"), 8443).as_deref(), Some("https://[::1]:8443/x"));
        // The absolute form names the host itself, with or without a path.
        assert_eq!(to("http://other.example/p?q", host, 443).as_deref(), Some("https://other.example/p?q"));
        assert_eq!(to("http://other.example?q", host, 443).as_deref(), Some("https://other.example/?q"));
        // A path that starts like an authority stays a path on the host.
        assert_eq!(to("//evil.example/x", host, 443).as_deref(), Some("https://api.example.com//evil.example/x"));
    }

    #[test]
    fn no_usable_host_is_no_redirect() {
        assert_eq!(to("/x", None, 443), None);
        assert_eq!(to("/x", Some("user@evil.example"), 443), None);
        assert_eq!(to("/x", Some("exa mple.com"), 443), None);
        assert_eq!(to("/x", Some(""), 443), None);
        assert_eq!(to("*", Some("api.example.com"), 443), None);
        assert_eq!(to("/x", Some(":80"), 443), None);
        assert_eq!(to("/x", Some("a.example\\@b.example"), 443), None);
        // The authority form (CONNECT's) names no resource to redirect to.
        assert_eq!(to("evil.example:80", Some("api.example.com"), 443), None);
    }
}
