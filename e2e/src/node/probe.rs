//! HTTP GET and TCP probes, as the kubelet runs them against a pod's IP.

use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One probe, resolved to an address.
#[derive(Clone, Debug, PartialEq)]
pub enum Check {
    /// `GET path` answers 200 to 399.
    Http {
        /// Host and port.
        addr: (Ipv4Addr, u16),
        /// Request path.
        path: String,
        /// Bound on the whole exchange.
        timeout: Duration,
    },
    /// A TCP connection opens.
    Tcp {
        /// Host and port.
        addr: (Ipv4Addr, u16),
        /// Bound on connecting.
        timeout: Duration,
    },
    /// A probe kind the agent cannot run (`exec`, `grpc`); it never passes.
    Unsupported,
}

fn port_number(port: &IntOrString, container: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// The check a probe of `container` describes, for a pod at `ip`.
pub fn check(probe: &Probe, container: &Container, ip: Ipv4Addr) -> Check {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    let host = |h: &Option<String>| h.as_deref().and_then(|h| h.parse().ok()).unwrap_or(ip);
    if let Some(h) = &probe.http_get {
        if h.scheme.as_deref().is_some_and(|s| s != "HTTP") {
            return Check::Unsupported;
        }
        return match port_number(&h.port, container) {
            Some(port) => Check::Http {
                addr: (host(&h.host), port),
                path: h.path.clone().unwrap_or_else(|| "/".into()),
                timeout,
            },
            None => Check::Unsupported,
        };
    }
    if let Some(t) = &probe.tcp_socket {
        return match port_number(&t.port, container) {
            Some(port) => Check::Tcp {
                addr: (host(&t.host), port),
                timeout,
            },
            None => Check::Unsupported,
        };
    }
    Check::Unsupported
}

async fn http_status(addr: (Ipv4Addr, u16), path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: kube-probe\r\nConnection: close\r\n\r\n",
        addr.0, addr.1
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    // The status line is all that matters.
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no HTTP status line"))
}

/// Runs the check once: whether it passed.
pub async fn run(check: &Check) -> bool {
    match check {
        Check::Http {
            addr,
            path,
            timeout,
        } => matches!(
            tokio::time::timeout(*timeout, http_status(*addr, path)).await,
            Ok(Ok(200..=399))
        ),
        Check::Tcp { addr, timeout } => {
            matches!(
                tokio::time::timeout(*timeout, TcpStream::connect(*addr)).await,
                Ok(Ok(_))
            )
        }
        Check::Unsupported => false,
    }
}

/// Consecutive results of one probe and the verdict the kubelet draws from them: a passing
/// probe fails after `failureThreshold` failures in a row (default 3), a failing one passes
/// after `successThreshold` passes in a row (default 1). One slow answer from a busy process
/// does not flip it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Streak {
    passes: i32,
    failures: i32,
}

impl Streak {
    /// Records one result; returns the verdict, given the verdict so far.
    pub fn record(&mut self, pass: bool, passing: bool, probe: &Probe) -> bool {
        if pass {
            self.passes = self.passes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.passes = 0;
        }
        if passing {
            self.failures < probe.failure_threshold.unwrap_or(3).max(1)
        } else {
            self.passes >= probe.success_threshold.unwrap_or(1).max(1)
        }
    }
}

/// How long until a probe runs again: its period once it passes, as the kubelet; `fast` while
/// it does not, so readiness shows soon after it holds.
pub fn next_in(probe: &Probe, passing: bool, fast: Duration) -> Duration {
    if passing {
        Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64)
    } else {
        fast
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, HTTPGetAction};

    #[test]
    fn named_ports_resolve_through_the_container_ports() {
        let c = Container {
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: 8000,
                ..ContainerPort::default()
            }]),
            ..Container::default()
        };
        let probe = Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/ready".into()),
                port: IntOrString::String("http".into()),
                ..HTTPGetAction::default()
            }),
            timeout_seconds: Some(3),
            ..Probe::default()
        };
        let ip = Ipv4Addr::new(127, 9, 0, 2);
        assert_eq!(
            check(&probe, &c, ip),
            Check::Http {
                addr: (ip, 8000),
                path: "/ready".into(),
                timeout: Duration::from_secs(3)
            }
        );
        let mut unnamed = probe.clone();
        unnamed.http_get.as_mut().unwrap().port = IntOrString::String("nope".into());
        assert_eq!(check(&unnamed, &c, ip), Check::Unsupported);
    }

    #[test]
    fn a_verdict_flips_only_after_its_threshold_of_results_in_a_row() {
        let probe = Probe {
            failure_threshold: Some(3),
            success_threshold: Some(2),
            ..Probe::default()
        };
        let mut s = Streak::default();
        assert!(!s.record(true, false, &probe), "one pass of two");
        assert!(s.record(true, false, &probe), "two passes in a row");
        assert!(s.record(false, true, &probe));
        assert!(s.record(false, true, &probe));
        assert!(s.record(true, true, &probe), "a pass resets the failures");
        assert!(s.record(false, true, &probe));
        assert!(s.record(false, true, &probe));
        assert!(!s.record(false, true, &probe), "the third failure in a row");
        let p = Probe::default();
        assert_eq!(
            next_in(&p, true, Duration::from_millis(500)),
            Duration::from_secs(10)
        );
        assert_eq!(
            next_in(&p, false, Duration::from_millis(500)),
            Duration::from_millis(500)
        );
    }

    #[tokio::test]
    async fn an_http_probe_passes_on_2xx_and_fails_on_5xx_or_a_closed_port() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await.unwrap();
                let reply = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                s.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        let c = Check::Http {
            addr: (Ipv4Addr::LOCALHOST, port),
            path: "/ready".into(),
            timeout: Duration::from_secs(30),
        };
        assert!(run(&c).await);
        assert!(!run(&c).await);
        server.await.unwrap();
        assert!(!run(&c).await, "nothing listens any more");
    }
}
