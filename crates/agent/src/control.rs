//! The agent's control socket (`$TESSERA_HOME/agent.sock`): one JSON
//! object per line each way. It attaches and detaches VM disks (`tessera
//! run` on a shared agent), says what the agent serves, and hands the
//! agent's listeners to a successor (`tessera serve --takeover`), passing
//! their descriptors over the socket (`SCM_RIGHTS`).
//!
//! ```text
//! {"op":"attach","export":"app@run-1","disk":"vhost-user","profile":"auto","owner":4242}
//!   -> {"ok":true,"socket":"/…/vhost-user/app@run-1.sock","export":"app@run-1","disk":"vhost-user","prefetching":false,"profile_chunks":0}
//! {"op":"detach","export":"app@run-1","record_until":1.25,"discard":true}
//!   -> {"ok":true,"chunks_fetched":{"disk":0,"memory":310,"origin":0,...},"profile_recorded":0}
//! {"op":"status"}   -> {"ok":true,"pid":…,"attached":[…],"nbd":[…],"vhost_user":"DIR"}
//! {"op":"handover"} -> {"ok":true,"listeners":[…],"attached":[…]} with the descriptors
//! ```

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a VM reaches its disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskKind {
    /// vhost-user-blk: the VMM maps guest memory into the agent.
    #[serde(rename = "vhost-user")]
    VhostUser,
    /// NBD on the agent's unix socket.
    #[serde(rename = "nbd")]
    Nbd,
}

impl DiskKind {
    /// The name used on the command line and in reports.
    pub fn label(self) -> &'static str {
        match self {
            DiskKind::VhostUser => "vhost-user",
            DiskKind::Nbd => "nbd",
        }
    }
}

/// What to do with the image's start-up profile while a disk is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProfileMode {
    /// Nothing.
    #[default]
    Off,
    /// Prefetch the recorded profile, or record one if there is none.
    Auto,
}

/// A request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Serve `export` to a VM.
    Attach {
        /// `NAME` or `NAME@LABEL`.
        export: String,
        /// How.
        disk: DiskKind,
        /// The start-up profile.
        #[serde(default)]
        profile: ProfileMode,
        /// The process the VM's life hangs on (`tessera run`): an agent
        /// restarted after this one died does not serve the disk again if
        /// that process is gone.
        #[serde(default)]
        owner: Option<u32>,
    },
    /// Stop serving `export`.
    Detach {
        /// As attached.
        export: String,
        /// Record the profile as read up to this many seconds after the attach.
        #[serde(default)]
        record_until: Option<f64>,
        /// Remove the overlay too.
        #[serde(default)]
        discard: bool,
    },
    /// What the agent serves.
    Status,
    /// Hand every listener over to the caller, then stop.
    Handover,
}

/// The answer to an attach.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attached {
    /// The socket the VMM connects to.
    pub socket: PathBuf,
    /// The export (for NBD, the name to ask for).
    pub export: String,
    /// How.
    pub disk: DiskKind,
    /// Whether a recorded profile is being prefetched.
    pub prefetching: bool,
    /// Chunks of that profile.
    pub profile_chunks: usize,
}

/// The answer to a detach.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Detached {
    /// Chunks the disk read, by the tier that had them.
    pub chunks_fetched: BTreeMap<String, u64>,
    /// Chunks of the profile recorded (0 if none was).
    pub profile_recorded: usize,
}

/// The answer to a status request.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    /// The agent's process.
    pub pid: u32,
    /// Exports attached to VMs.
    pub attached: Vec<String>,
    /// NBD listeners.
    pub nbd: Vec<String>,
    /// The directory of the vhost-user sockets.
    pub vhost_user: Option<PathBuf>,
}

/// What a successor is handed, besides the descriptors (in this order:
/// `listeners`, then one per vhost-user export of `attached`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Handover {
    /// What each of the first descriptors listens on: `control`, or an NBD
    /// listen address (`unix:PATH`, `HOST:PORT`).
    pub listeners: Vec<String>,
    /// The exports attached over vhost-user, whose listeners follow.
    pub attached: Vec<String>,
}

/// Control connections served at once.
const MAX_CONNECTIONS: usize = 64;
/// Bytes of one request line.
const MAX_LINE: usize = 64 << 10;

/// What the agent does for its control socket.
pub trait Controlled: Send + Sync {
    /// Serves `export` to a VM whose life hangs on process `owner`.
    fn attach(&self, export: &str, disk: DiskKind, profile: ProfileMode, owner: Option<u32>) -> Result<Attached, String>;
    /// Stops serving it.
    fn detach(&self, export: &str, record_until: Option<Duration>, discard: bool) -> Result<Detached, String>;
    /// What it serves.
    fn status(&self) -> Status;
    /// The descriptors to hand over and what they are; after they are
    /// sent, [`Controlled::handed_over`] is called.
    fn handover(&self) -> Result<(Handover, Vec<OwnedFd>), String>;
    /// The successor has the descriptors: quiesce and stop.
    fn handed_over(&self);
    /// The descriptors could not be sent: carry on serving.
    fn handover_failed(&self) {}
}

/// Serves the control socket on `listener` until `stop` is set (on
/// handover: the successor accepts on the same socket from then on).
pub fn serve(listener: UnixListener, agent: Arc<dyn Controlled>, stop: Arc<AtomicBool>) {
    let control_fd = listener.as_raw_fd();
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        let mut p = libc::pollfd { fd: control_fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: poll reads and writes one pollfd we own.
        if unsafe { libc::poll(&mut p, 1, 100) } <= 0 || stop.load(Ordering::SeqCst) {
            continue;
        }
        let Ok((mut stream, _)) = listener.accept() else { continue };
        // A local socket (mode 0600), but still bounded.
        if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = stream.write_all(format!("{}\n", json_err(format!("the agent has {MAX_CONNECTIONS} control connections open: try again"))).as_bytes());
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let (agent, active) = (Arc::clone(&agent), Arc::clone(&active));
        std::thread::spawn(move || {
            serve_one(stream, agent.as_ref());
            active.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Answers one connection's requests.
fn serve_one(stream: UnixStream, agent: &dyn Controlled) {
    // Clients connect per request (`tessera run` does): an idle connection
    // is closed after a minute.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let Ok(mut out) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    loop {
        // At most MAX_LINE bytes are held for a line, newline or not.
        let mut bytes = Vec::new();
        match (&mut reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut bytes) {
            Ok(0) | Err(_) => break,
            Ok(_) if bytes.len() > MAX_LINE => {
                let _ = out.write_all(format!("{}\n", json_err(format!("a request is at most {MAX_LINE} bytes"))).as_bytes());
                break;
            }
            Ok(_) => {}
        }
        let Ok(line) = String::from_utf8(bytes) else { break };
        let line = line.trim_end();
        let answer = match serde_json::from_str::<Request>(line) {
            Err(e) => json_err(format!("bad request: {e}")),
            Ok(Request::Attach { export, disk, profile, owner }) => ok_with(agent.attach(&export, disk, profile, owner)),
            Ok(Request::Detach { export, record_until, discard }) => {
                let until = record_until.filter(|s| s.is_finite() && *s >= 0.0).map(Duration::from_secs_f64);
                ok_with(agent.detach(&export, until, discard))
            }
            Ok(Request::Status) => ok_with(Ok::<_, String>(agent.status())),
            Ok(Request::Handover) => match agent.handover() {
                Err(e) => json_err(e),
                Ok((what, fds)) => {
                    let all: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
                    let body = ok_with(Ok::<_, String>(what));
                    if send_with_fds(&out, format!("{body}\n").as_bytes(), &all).is_err() {
                        agent.handover_failed();
                        return;
                    }
                    // The successor has them: quiesce, then say so.
                    agent.handed_over();
                    let _ = out.write_all(b"{\"ok\":true,\"released\":true}\n");
                    return;
                }
            },
        };
        if out.write_all(format!("{answer}\n").as_bytes()).is_err() {
            break;
        }
    }
}

fn json_err(e: String) -> serde_json::Value {
    serde_json::json!({"ok": false, "error": e})
}

fn ok_with<T: Serialize>(r: Result<T, String>) -> serde_json::Value {
    match r {
        Ok(v) => {
            let mut v = serde_json::to_value(v).expect("answers serialise");
            v["ok"] = true.into();
            v
        }
        Err(e) => json_err(e),
    }
}

/// A client of an agent's control socket.
pub struct Client {
    stream: BufReader<UnixStream>,
    path: PathBuf,
}

impl Client {
    /// Connects to the agent at `path`.
    pub fn connect(path: &Path) -> io::Result<Client> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Client { stream: BufReader::new(s), path: path.to_owned() })
    }

    /// Where the agent is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn call<T: serde::de::DeserializeOwned>(&mut self, request: &Request) -> io::Result<T> {
        self.stream.get_mut().write_all(format!("{}\n", serde_json::to_string(request).expect("requests serialise")).as_bytes())?;
        let mut line = String::new();
        if self.stream.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the agent closed the control connection"));
        }
        answer(&line)
    }

    /// Attaches `export` for a VM whose life hangs on this process.
    pub fn attach(&mut self, export: &str, disk: DiskKind, profile: ProfileMode) -> io::Result<Attached> {
        self.call(&Request::Attach { export: export.to_owned(), disk, profile, owner: Some(std::process::id()) })
    }

    /// Detaches `export`.
    pub fn detach(&mut self, export: &str, record_until: Option<Duration>, discard: bool) -> io::Result<Detached> {
        self.call(&Request::Detach { export: export.to_owned(), record_until: record_until.map(|d| d.as_secs_f64()), discard })
    }

    /// What the agent serves.
    pub fn status(&mut self) -> io::Result<Status> {
        self.call(&Request::Status)
    }

    /// Asks the agent for its listeners; returns them once it has
    /// quiesced its VMs' disks and closed their devices (it then stops).
    pub fn handover(mut self) -> io::Result<(Handover, Vec<OwnedFd>)> {
        self.stream.get_mut().write_all(format!("{}\n", serde_json::to_string(&Request::Handover).expect("requests serialise")).as_bytes())?;
        let (bytes, fds) = recv_with_fds(self.stream.get_ref())?;
        let text = String::from_utf8_lossy(&bytes);
        let (line, rest) = text.split_once('\n').unwrap_or((&text, ""));
        let what: Handover = answer(line)?;
        if fds.len() != what.listeners.len() + what.attached.len() {
            return Err(io::Error::other(format!(
                "the agent handed over {} descriptors for {} listeners",
                fds.len(),
                what.listeners.len() + what.attached.len()
            )));
        }
        let mut released = rest.to_owned();
        if !released.contains('\n') && self.stream.read_line(&mut released)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the agent stopped before it released its disks"));
        }
        Ok((what, fds))
    }
}

fn answer<T: serde::de::DeserializeOwned>(line: &str) -> io::Result<T> {
    let v: serde_json::Value = serde_json::from_str(line.trim()).map_err(|e| io::Error::other(format!("the agent answered {line:?}: {e}")))?;
    if v["ok"] != true {
        return Err(io::Error::other(v["error"].as_str().unwrap_or("the agent refused").to_owned()));
    }
    serde_json::from_value(v).map_err(|e| io::Error::other(format!("the agent answered {line:?}: {e}")))
}

/// Most descriptors one handover carries.
const MAX_FDS: usize = 250;

/// Sends `bytes` with `fds` attached (`SCM_RIGHTS`).
fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::other(format!("{} descriptors are more than one message carries", fds.len())));
    }
    let payload = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // SAFETY: msghdr is plain data; every pointer set below points into
    // buffers that outlive the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer is CMSG_SPACE(payload) bytes, enough for
    // one header and `payload` bytes of descriptors.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr() as *const u8, libc::CMSG_DATA(cmsg), payload);
    }
    // SAFETY: the message is valid for the call (see above).
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if (n as usize) < bytes.len() {
        // The rest of the line, without descriptors.
        (&*stream).write_all(&bytes[n as usize..])?;
    }
    Ok(())
}

/// Receives one line and the descriptors sent with it.
fn recv_with_fds(stream: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: msghdr is plain data; its pointers point into buffers that
    // outlive the recvmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: the message is valid for the call.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` with `msg_controllen` bytes of
    // well-formed headers; each SCM_RIGHTS payload is an array of
    // descriptors now owned by this process.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("descriptors were cut off"));
    }
    let mut bytes = buf[..n as usize].to_vec();
    // The line may have come in more than one piece.
    while !bytes.ends_with(b"\n") {
        let mut more = [0u8; 4096];
        let m = io::Read::read(&mut &*stream, &mut more)?;
        if m == 0 {
            break;
        }
        bytes.extend_from_slice(&more[..m]);
    }
    Ok((bytes, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_pass_with_a_line() {
        let (a, b) = UnixStream::pair().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let l1 = UnixListener::bind(dir.path().join("one")).unwrap();
        let l2 = UnixListener::bind(dir.path().join("two")).unwrap();
        send_with_fds(&a, b"{\"ok\":true}\n", &[l1.as_raw_fd(), l2.as_raw_fd()]).unwrap();
        let (bytes, fds) = recv_with_fds(&b).unwrap();
        assert_eq!(bytes, b"{\"ok\":true}\n");
        assert_eq!(fds.len(), 2);
        // The received descriptor listens where the first did.
        let got = UnixListener::from(fds.into_iter().next().unwrap());
        let _c = UnixStream::connect(dir.path().join("one")).unwrap();
        got.set_nonblocking(true).unwrap();
        assert!(got.accept().is_ok());
    }

    #[test]
    fn requests_parse() {
        let r: Request = serde_json::from_str(r#"{"op":"attach","export":"a@b","disk":"vhost-user"}"#).unwrap();
        assert!(matches!(r, Request::Attach { disk: DiskKind::VhostUser, profile: ProfileMode::Off, .. }));
        assert!(serde_json::from_str::<Request>(r#"{"op":"format-the-disk"}"#).is_err());
    }
}
