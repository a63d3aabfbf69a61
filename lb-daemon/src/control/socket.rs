//! The control socket: a Unix socket, root only, one JSON request a line
//! and one JSON answer each (`control::api`), as `lbctl` speaks it. Each
//! request is answered from the daemon's view; an operator's change wakes
//! the reconciler for the kernel's side of it. The socket also refuses a
//! second lbd beside a running one.

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::{bail, Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::{
    control::api::{Request, Response, Status},
    daemon::{lock, reload::Reloader, Daemon},
};

/// Whether an lbd answers on the control socket at `path`.
pub fn answers(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// Bind the control socket, refusing to start beside a running lbd.
pub fn bind_control_socket(path: &Path) -> Result<UnixListener> {
    if answers(path) {
        bail!(
            "another lbd is already running (its control socket {} answers); stop it first",
            path.display()
        );
    }
    // A socket file nobody answers on is left over from a crash.
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    // Root only: the socket changes how the router forwards.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("restricting {} to root", path.display()))?;
    Ok(listener)
}

/// Answer requests on one connection, one JSON line each; an operator's
/// change wakes the reconciler (`changed`) for the kernel's side of it.
pub async fn serve(
    stream: UnixStream,
    daemon: Arc<Mutex<Daemon>>,
    changed: Arc<tokio::sync::Notify>,
    reloader: Reloader,
) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Ok(Request::Events { follow: true }) = serde_json::from_str::<Request>(&line) {
            follow_events(&mut write, &daemon).await;
            return;
        }
        if let Ok(Request::Reload) = serde_json::from_str::<Request>(&line) {
            let (said, restart) = tokio::task::block_in_place(|| reloader.reload(&daemon));
            if let Ok(mut out) = serde_json::to_vec(&said) {
                out.push(b'\n');
                let _ = write.write_all(&out).await;
                let _ = write.flush().await;
            }
            if restart {
                let socket = daemon.lock().map(|d| d.config.daemon.socket.clone());
                if let Ok(socket) = socket {
                    reloader.restart_in_place(&socket);
                }
            }
            continue;
        }
        let response = match serde_json::from_str::<Request>(&line) {
            // A status walks the flow table: let the runtime move other
            // tasks off this thread meanwhile.
            Ok(req) => {
                let changes = matches!(req, Request::Uplink { .. });
                let response = tokio::task::block_in_place(|| handle(req, &daemon));
                if changes {
                    changed.notify_one();
                }
                response
            }
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        let Ok(mut out) = serde_json::to_vec(&response) else {
            break;
        };
        out.push(b'\n');
        if write.write_all(&out).await.is_err() {
            break;
        }
    }
}

/// `lbctl events --follow`: the recent events, then each new one, until
/// the client goes. A follower too slow to keep up is told how many it
/// missed.
async fn follow_events(write: &mut tokio::net::unix::OwnedWriteHalf, daemon: &Mutex<Daemon>) {
    let Ok((recent, mut new)) = daemon.lock().map(|d| d.events()) else {
        return;
    };
    let mut reply = Response::Events(recent);
    loop {
        let Ok(mut out) = serde_json::to_vec(&reply) else {
            return;
        };
        out.push(b'\n');
        if write.write_all(&out).await.is_err() {
            return;
        }
        reply = match new.recv().await {
            Ok(event) => Response::Event(event),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                Response::Event(crate::control::events::Event {
                    at: crate::control::events::rfc3339(std::time::SystemTime::now()),
                    kind: "daemon".into(),
                    uplink: None,
                    message: format!("{missed} events missed: this follower was too slow"),
                })
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
    }
}

/// A whole status: the daemon's part under its lock, the flow counts
/// after letting go of it.
pub fn status_of(daemon: &Mutex<Daemon>) -> Result<Status> {
    let draft = lock(daemon, "the daemon's state")?.status()?;
    draft.finish()
}

fn handle(req: Request, daemon: &Mutex<Daemon>) -> Response {
    let mut d = match lock(daemon, "the daemon's state") {
        Ok(d) => d,
        Err(e) => {
            return Response::Error {
                message: format!("{e:#}"),
            }
        }
    };
    match req {
        Request::Status => {
            let draft = d.status();
            // The flow count walks the whole table: not while holding the
            // daemon, or health changes would wait for it.
            drop(d);
            match draft.and_then(|draft| draft.finish()) {
                Ok(s) => Response::Status(Box::new(s)),
                Err(e) => Response::Error {
                    message: format!("{e:#}"),
                },
            }
        }
        Request::Events { .. } => Response::Events(d.events().0),
        // Answered by `serve` itself: it may start lbd again.
        Request::Reload => Response::Error {
            message: "reload is answered elsewhere".into(),
        },
        Request::Explain {
            src,
            src_port,
            dst,
            dst_port,
            proto,
            lan,
            dscp,
        } => {
            use std::net::IpAddr;
            let explained = match (src, dst) {
                (IpAddr::V4(src), IpAddr::V4(dst)) => {
                    let key = lb_common::maps::FlowKey {
                        src_addr: src.octets(),
                        dst_addr: dst.octets(),
                        src_port: src_port.to_be_bytes(),
                        dst_port: dst_port.to_be_bytes(),
                        proto,
                        _pad: [0; 3],
                    };
                    d.explain(&key, &crate::daemon::On { lan, dscp })
                }
                (IpAddr::V6(src), IpAddr::V6(dst)) => {
                    let key = lb_common::maps::FlowKey6 {
                        src_addr: src.octets(),
                        dst_addr: dst.octets(),
                        src_port: src_port.to_be_bytes(),
                        dst_port: dst_port.to_be_bytes(),
                        proto,
                        _pad: [0; 3],
                    };
                    d.explain6(&key, &crate::daemon::On { lan, dscp })
                }
                _ => Err(anyhow::anyhow!(
                    "explain {src} to {dst}: the two addresses are of different families; \
                     give two IPv4 or two IPv6 addresses"
                )),
            };
            match explained {
                Ok(e) => Response::Explained(e),
                Err(e) => Response::Error {
                    message: format!("{e:#}"),
                },
            }
        }
        Request::Flows {
            uplink,
            client,
            limit,
        } => {
            let query = d.flow_query();
            // The walk: not while holding the daemon.
            drop(d);
            match query.run(uplink.as_deref(), client, limit) {
                Ok(list) => Response::Flows(list),
                Err(e) => Response::Error {
                    message: format!("{e:#}"),
                },
            }
        }
        Request::Uplink { name, action } => match d.operate(&name, action) {
            Ok(message) => Response::Done { message },
            Err(e) => Response::Error {
                message: format!("{e:#}"),
            },
        },
    }
}
