//! The runtime directory: where a deployment's sockets and lock live, named as DPDK names them.
//!
//! `base/dpdk/<prefix>` with `base` = `$RUNTIME_DIRECTORY`, else `/var/run` for root, else
//! `$XDG_RUNTIME_DIR`, else `/tmp`; created mode 0700. In it: the primary's socket `mp_socket`,
//! each secondary's `mp_socket_<pid>_<stamp>` (and memplane's `mp_tx_<pid>_<stamp>`, which it
//! sends one-way messages from, and `mp_req_<pid>_<n>`, which its requesters use), and
//! memplane's primary lock `memplane_config`,
//! held with an open-file-description write lock for the primary's whole life. A DPDK primary in
//! the same directory is recognised by the lock it holds on `config`.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::Error;

/// The primary's socket name.
pub const PRIMARY_SOCKET: &str = "mp_socket";
/// Prefix of every secondary's socket name.
pub const SECONDARY_SOCKET_PREFIX: &str = "mp_socket_";
/// Prefix of the sockets synchronous requesters send from (`mp_req_<pid>_<n>`); deliberately
/// not `mp_socket_*`, which names secondaries.
pub const REQUEST_SOCKET_PREFIX: &str = "mp_req_";
/// Prefix of the socket a memplane secondary sends its one-way messages to the primary from
/// (`mp_tx_<pid>_<stamp>`, the stamp of its `mp_socket_<pid>_<stamp>`): connected to the
/// primary, so its sends skip the kernel's path lookup. Not `mp_socket_*`: no broadcast takes it
/// for a secondary.
pub const ONE_WAY_SOCKET_PREFIX: &str = "mp_tx_";
/// memplane's primary lock (and, with the memory layer, its shared configuration).
pub const MEMPLANE_CONFIG: &str = "memplane_config";
/// DPDK's shared configuration, locked by a live DPDK primary.
pub const DPDK_CONFIG: &str = "config";
/// The default file prefix, as DPDK's.
pub const DEFAULT_PREFIX: &str = "rte";
/// Longest socket path the kernel accepts (108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

const LOCK_MAGIC: &[u8; 8] = b"MPLNLOCK";

/// The base directory DPDK would use for this process.
pub fn default_base() -> PathBuf {
    if let Some(d) = std::env::var_os("RUNTIME_DIRECTORY") {
        return PathBuf::from(d);
    }
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/run");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from("/tmp"),
    }
}

/// Checks that `prefix` can name a runtime directory (`base/dpdk/<prefix>`) and start hugepage
/// file names: one path component, not `.` or `..`, and no `%` (DPDK refuses it too: it
/// formats file names with the prefix).
pub fn check_prefix(prefix: &str) -> Result<(), Error> {
    let bad =
        prefix.is_empty() || prefix == "." || prefix == ".." || prefix.contains(['/', '%', '\0']);
    if bad {
        return Err(Error::InvalidPrefix {
            prefix: prefix.to_owned(),
        });
    }
    Ok(())
}

/// The runtime directory for `prefix`: `base/dpdk/<prefix>`.
pub fn default_dir(prefix: &str) -> PathBuf {
    default_base().join("dpdk").join(prefix)
}

/// Creates `dir` (and its parent) with mode 0700 if missing.
pub fn create(dir: &Path) -> Result<(), Error> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true).mode(0o700);
    b.create(dir)
        .map_err(|e| Error::io(format!("create runtime dir {}", dir.display()), e))?;
    Ok(())
}

/// Checks that a socket path fits `sun_path`.
pub fn check_socket_path(p: &Path) -> Result<(), Error> {
    let n = p.as_os_str().len();
    if n > MAX_SOCKET_PATH {
        return Err(Error::PathTooLong {
            path: p.to_owned(),
            len: n,
        });
    }
    Ok(())
}

/// The socket path of a new secondary: `mp_socket_<pid>_<stamp>`.
pub fn secondary_socket(dir: &Path) -> PathBuf {
    let pid = std::process::id();
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let stamp = (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64);
    dir.join(format!("{SECONDARY_SOCKET_PREFIX}{pid}_{stamp:x}"))
}

/// The one-way socket path of the secondary whose socket is `main` (`mp_socket_<pid>_<stamp>`
/// becomes `mp_tx_<pid>_<stamp>`, in the same directory); `None` for any other name.
pub fn one_way_socket(main: &Path) -> Option<PathBuf> {
    let name = main.file_name()?.to_str()?;
    let rest = name.strip_prefix(SECONDARY_SOCKET_PREFIX)?;
    Some(main.with_file_name(format!("{ONE_WAY_SOCKET_PREFIX}{rest}")))
}

/// For a sender at `path` named as a one-way socket (`mp_tx_<pid>_<stamp>`) by process `pid`:
/// the socket of the secondary that owns it (`mp_socket_<pid>_<stamp>`), which is the peer its
/// messages come from. `None` for any other name, or when the pid in the name is not the
/// sender's (then the sender is taken at its word, as any other).
pub fn owner_of_one_way(path: &Path, pid: u32) -> Option<PathBuf> {
    let rest = path
        .file_name()?
        .to_str()?
        .strip_prefix(ONE_WAY_SOCKET_PREFIX)?;
    let named: u32 = rest.split('_').next()?.parse().ok()?;
    (named == pid && pid != 0)
        .then(|| path.with_file_name(format!("{SECONDARY_SOCKET_PREFIX}{rest}")))
}

/// True for a secondary's socket file name.
pub fn is_secondary_socket(name: &OsStr) -> bool {
    name.to_str()
        .is_some_and(|s| s.starts_with(SECONDARY_SOCKET_PREFIX))
}

/// The pid in a secondary's socket file name (`mp_socket_<pid>_<stamp>`, as DPDK names it).
pub fn secondary_pid(name: &OsStr) -> Option<i32> {
    let rest = name.to_str()?.strip_prefix(SECONDARY_SOCKET_PREFIX)?;
    rest.split('_').next()?.parse().ok().filter(|&p| p > 0)
}

/// Whether process `pid` (of this pid namespace) holds the Unix socket bound at `path`: the
/// socket's inode, from `/proc/net/unix`, among the process's fds. A pid taken from a socket's
/// name or from a lock file is the process's own view; in another pid namespace it names
/// some other process here. False when it cannot tell (no such process, no right to read its
/// fds).
pub fn socket_owned_by(path: &Path, pid: i32) -> bool {
    let (Some(name), Ok(want)) = (path.file_name(), fs::canonicalize(path)) else {
        return false;
    };
    let Ok(table) = fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    // "Num RefCount Protocol Flags Type St Inode Path": the inode is the 7th field. The path
    // is as the owner spelled it (it may reach the directory through a symbolic link).
    let Some(inode) = table.lines().find_map(|l| {
        let mut f = l.split_ascii_whitespace();
        let inode = f.nth(6)?;
        let bound = Path::new(f.next()?);
        (f.next().is_none()
            && bound.file_name() == Some(name)
            && fs::canonicalize(bound).is_ok_and(|b| b == want))
        .then(|| inode.to_owned())
    }) else {
        return false;
    };
    let link = format!("socket:[{inode}]");
    fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == link.as_str()))
}

/// Whether some process holds a lock on the file at `path` (the test DPDK's
/// `rte_eal_primary_proc_alive` makes).
pub fn locked_by_someone(path: &Path) -> bool {
    lock_holder(path).is_some()
}

/// Whether some process holds a lock on the file at `path`, and its pid when the kernel says
/// (a traditional process-associated lock, as DPDK takes; an open-file-description lock, as
/// memplane takes, has none: the kernel reports -1).
fn lock_holder(path: &Path) -> Option<Option<u32>> {
    let f = File::open(path).ok()?;
    let mut fl = flock_all(libc::F_WRLCK);
    // SAFETY: `f` is an open file for the duration of the call and `fl` is a valid, initialised
    // `struct flock` that fcntl may write into.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    (r == 0 && fl.l_type != libc::F_UNLCK as i16)
        .then(|| u32::try_from(fl.l_pid).ok().filter(|&p| p > 0))
}

/// Takes the lock a DPDK primary holds on `path` (a traditional write lock of the whole
/// file), for tests that play a DPDK primary; held until the returned file is closed.
#[cfg(test)]
pub(crate) fn hold_dpdk_lock(path: &Path) -> File {
    let f = File::create(path).unwrap();
    let fl = flock_all(libc::F_WRLCK);
    // SAFETY: `f` is open and `fl` is a valid `struct flock` for the whole file.
    assert_eq!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) }, 0);
    f
}

fn flock_all(kind: libc::c_int) -> libc::flock {
    // SAFETY: `struct flock` is plain old data; all-zero is a valid value we then fill in.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = 0;
    fl.l_len = 0;
    fl
}

/// A live primary's pid, if one holds this directory (memplane's lock or DPDK's).
pub fn live_primary(dir: &Path) -> Option<PrimaryInfo> {
    let ours = dir.join(MEMPLANE_CONFIG);
    if locked_by_someone(&ours) {
        return Some(PrimaryInfo {
            pid: read_lock_pid(&ours),
            dpdk: false,
        });
    }
    if let Some(pid) = lock_holder(&dir.join(DPDK_CONFIG)) {
        return Some(PrimaryInfo { pid, dpdk: true });
    }
    None
}

/// Who the live primary is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrimaryInfo {
    /// Its pid, when it recorded one.
    pub pid: Option<u32>,
    /// It is a DPDK primary (it holds DPDK's `config`).
    pub dpdk: bool,
}

fn read_lock_pid(path: &Path) -> Option<u32> {
    let mut b = [0u8; 16];
    let mut f = File::open(path).ok()?;
    f.read_exact(&mut b).ok()?;
    (&b[..8] == LOCK_MAGIC).then(|| u32::from_le_bytes([b[8], b[9], b[10], b[11]]))
}

/// The primary's hold on a runtime directory: an open-file-description write lock on
/// `memplane_config`, released when this is dropped (or the process dies).
pub struct PrimaryLock {
    file: File,
    path: PathBuf,
}

impl PrimaryLock {
    /// Takes the lock, or says who holds it.
    pub fn acquire(dir: &Path) -> Result<PrimaryLock, Error> {
        if let Some(p) = live_primary(dir).filter(|p| p.dpdk) {
            return Err(Error::PrimaryExists {
                dir: dir.to_owned(),
                pid: p.pid,
                dpdk: true,
            });
        }
        let path = dir.join(MEMPLANE_CONFIG);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        let fl = flock_all(libc::F_WRLCK);
        // SAFETY: `file` is open and `fl` is a valid `struct flock` describing the whole file.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
                return Err(Error::PrimaryExists {
                    dir: dir.to_owned(),
                    pid: read_lock_pid(&path),
                    dpdk: false,
                });
            }
            return Err(Error::io(format!("lock {}", path.display()), e));
        }
        let mut lock = PrimaryLock { file, path };
        lock.write_header()
            .map_err(|e| Error::io(format!("write {}", lock.path.display()), e))?;
        Ok(lock)
    }

    fn write_header(&mut self) -> io::Result<()> {
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(LOCK_MAGIC);
        h[8..12].copy_from_slice(&std::process::id().to_le_bytes());
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(&h)?;
        self.file.sync_data()
    }

    /// The lock file (also the file the memory layer keeps its shared configuration in).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the lock file; the lock itself goes with the file description on drop.
    pub fn remove(&self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Sockets of secondaries in `dir`, in directory order.
pub fn secondary_sockets(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        if is_secondary_socket(&e.file_name()) {
            v.push(e.path());
        }
    }
    Ok(v)
}

/// Whether a datagram socket is bound at `path` (a connect succeeds).
pub fn socket_alive(path: &Path) -> bool {
    let Ok(s) = rustix::net::socket_with(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::DGRAM,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    ) else {
        return false;
    };
    let Ok(addr) = rustix::net::SocketAddrUnix::new(path) else {
        return false;
    };
    rustix::net::connect(&s, &addr).is_ok()
}

/// Removes secondary sockets nobody is bound to any more (with the request and one-way sockets
/// of dead processes), and a stale primary socket; returns how many were removed. Only a
/// process holding the primary lock may call this.
pub fn clean_stale(dir: &Path) -> usize {
    let mut n = 0;
    let primary = dir.join(PRIMARY_SOCKET);
    if primary.exists() && !socket_alive(&primary) && fs::remove_file(&primary).is_ok() {
        n += 1;
    }
    for p in secondary_sockets(dir).unwrap_or_default() {
        if !socket_alive(&p) && fs::remove_file(&p).is_ok() {
            n += 1;
        }
    }
    let requesters = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name().to_str().is_some_and(|s| {
                s.starts_with(REQUEST_SOCKET_PREFIX) || s.starts_with(ONE_WAY_SOCKET_PREFIX)
            })
        });
    for e in requesters {
        if !socket_alive(&e.path()) && fs::remove_file(e.path()).is_ok() {
            n += 1;
        }
    }
    n
}

/// Makes a path world-accessible (tests of foreign senders use it on purpose).
pub fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_comes_from_a_secondary_socket_name() {
        let pid = |s: &str| secondary_pid(OsStr::new(s));
        assert_eq!(pid("mp_socket_1234_29329fef07f1"), Some(1234));
        // DPDK's secondaries: pid, then a timestamp in hex, as ours.
        assert_eq!(pid("mp_socket_77_5a3c"), Some(77));
        assert_eq!(pid("mp_socket"), None, "the primary's socket");
        assert_eq!(pid("mp_socket_"), None);
        assert_eq!(pid("mp_socket_x_12"), None);
        assert_eq!(pid("mp_socket_0_12"), None, "no process 0");
        assert_eq!(pid("mp_socket_-5_12"), None);
        assert_eq!(pid("mp_req_1234_0"), None, "a request socket");
        assert_eq!(pid("mp_tx_1234_29329fef07f1"), None, "a one-way socket");
    }

    #[test]
    fn a_one_way_socket_stands_for_its_secondary_only_for_the_pid_in_its_name() {
        let main = Path::new("/run/x/mp_socket_1234_29329fef07f1");
        let tx = one_way_socket(main).unwrap();
        assert_eq!(tx, Path::new("/run/x/mp_tx_1234_29329fef07f1"));
        assert_eq!(owner_of_one_way(&tx, 1234).as_deref(), Some(main));
        assert_eq!(owner_of_one_way(&tx, 1235), None, "sent by another process");
        assert_eq!(owner_of_one_way(&tx, 0), None, "no credentials");
        assert_eq!(owner_of_one_way(main, 1234), None, "not a one-way socket");
        assert_eq!(owner_of_one_way(Path::new("/run/x/mp_tx_a_1"), 1234), None);
        assert_eq!(
            one_way_socket(Path::new("/run/x/mp_socket")),
            None,
            "the primary"
        );
        assert_eq!(one_way_socket(Path::new("/run/x/mp_req_1_2")), None);
    }

    #[test]
    fn a_socket_is_owned_by_the_process_that_holds_it_only() {
        let d = crate::socket::tests::dir("owned");
        let path = d.join("mp_socket_1_2");
        let me = std::process::id() as i32;
        assert!(!socket_owned_by(&path, me), "nothing bound there");
        let s = crate::socket::Socket::bind(&path).unwrap();
        assert!(socket_owned_by(&path, me));
        // Our parent (the test harness's) does not hold it.
        assert!(!socket_owned_by(
            &path,
            rustix::process::getppid().map_or(1, |p| p.as_raw_nonzero().get())
        ));
        drop(s);
        assert!(
            !socket_owned_by(&path, me),
            "closed: the file stays, the socket is gone"
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_posix_lock_holder_is_named_an_ofd_lock_holder_is_not() {
        let d = crate::socket::tests::dir("lockholder");
        let path = d.join("config");
        assert_eq!(lock_holder(&path), None, "no file");
        drop(File::create(&path).unwrap());
        assert_eq!(lock_holder(&path), None, "not locked");
        // DPDK's kind: a traditional record lock. An OFD query conflicts with it even from
        // the same process, and the kernel names the holder.
        let f = hold_dpdk_lock(&path);
        assert_eq!(lock_holder(&path), Some(Some(std::process::id())));
        drop(f);
        assert_eq!(lock_holder(&path), None, "released with its file");
        // memplane's kind: an open-file-description lock, whose holder has no pid.
        let held = PrimaryLock::acquire(&d).unwrap();
        assert_eq!(lock_holder(&d.join(MEMPLANE_CONFIG)), Some(None));
        drop(held);
        let _ = fs::remove_dir_all(&d);
    }
}
