//! Test helpers shared by memplane's crates.
//!
//! - [`TestDir`]: a fresh, short runtime directory per test, removed on drop;
//! - [`Child`]: this test binary re-executed in "child" mode (as DPDK's `test_mp_secondary`
//!   does), driven by line commands on stdin and answering on stdout; always killed and reaped;
//! - [`child_main`]: the child side: runs a command loop when the process was started as a child;
//! - [`stop`]: stops a process (SIGSTOP) and waits until every one of its threads is stopped.
//!
//! Tests wait for what a child says, never for a fixed time.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

/// How long a test waits for a child's answer before failing.
pub const ANSWER: Duration = Duration::from_secs(30);

/// The environment variable that makes a test binary a child.
pub const CHILD_ENV: &str = "MEMPLANE_TEST_CHILD_DIR";

/// A fresh runtime directory, removed on drop.
pub struct TestDir(PathBuf);

impl TestDir {
    /// Creates `/tmp/<tag>-<pid>-<n>` (short, so socket paths fit).
    pub fn new(tag: &str) -> TestDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = PathBuf::from(format!(
            "/tmp/{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        TestDir(p)
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The path as a string, for command lines.
    pub fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process (this test binary, re-executed) driven by line commands.
pub struct Child {
    child: std::process::Child,
    stdin: ChildStdin,
    out: Receiver<String>,
}

impl Child {
    /// Starts the test named `test` of this binary as a child working in `dir`, with extra
    /// environment variables.
    pub fn start(test: &str, dir: &Path, env: &[(&str, &str)]) -> Child {
        let exe = std::env::current_exe().expect("test binary path");
        let mut cmd = Command::new(exe);
        cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start child");
        let stdin = child.stdin.take().expect("child stdin");
        let stdout = child.stdout.take().expect("child stdout");
        let (tx, out) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest may print "test name ... " on the same line first.
                if let Some(i) = l.find("@@ ")
                    && tx.send(l[i + 3..].to_owned()).is_err()
                {
                    break;
                }
            }
        });
        Child { child, stdin, out }
    }

    /// The child's next answer.
    pub fn line(&mut self) -> String {
        self.out
            .recv_timeout(ANSWER)
            .unwrap_or_else(|e| panic!("child {} said nothing: {e}", self.child.id()))
    }

    /// Sends a command and returns the answer.
    pub fn cmd(&mut self, c: &str) -> String {
        writeln!(self.stdin, "{c}").expect("write to child");
        self.stdin.flush().expect("flush to child");
        self.line()
    }

    /// Sends a command without waiting for an answer.
    pub fn send(&mut self, c: &str) {
        writeln!(self.stdin, "{c}").expect("write to child");
        self.stdin.flush().expect("flush to child");
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the child with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child side: if this process was started as a child, returns its runtime directory.
pub fn child_dir() -> Option<PathBuf> {
    std::env::var_os(CHILD_ENV).map(PathBuf::from)
}

/// Prints an answer the parent reads.
pub fn say(s: impl AsRef<str>) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "@@ {}", s.as_ref());
    let _ = o.flush();
}

/// Runs the child's command loop: each stdin line is split into words and given to `f`, whose
/// answer is sent back; `quit` (or the end of stdin) ends it.
pub fn serve(mut f: impl FnMut(&[&str]) -> String) {
    for l in std::io::stdin().lock().lines().map_while(Result::ok) {
        let w: Vec<&str> = l.split_whitespace().collect();
        if w.is_empty() || w[0] == "quit" {
            break;
        }
        say(f(&w));
    }
}

/// Parses a hex number.
pub fn hexnum(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex number")
}

/// Bytes as hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Hex as bytes.
pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex byte"))
        .collect()
}

/// The permissions (`rw-s`, `---p`, ...) that `/proc/<pid>/maps` shows for the mapping holding
/// `va`; `pid` is a process id or `self`. Panics if nothing is mapped there.
pub fn map_perms(pid: &str, va: u64) -> String {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    for l in maps.lines() {
        let Some((range, rest)) = l.split_once(' ') else {
            continue;
        };
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        if (a..b).contains(&va) {
            return rest.get(..4).unwrap_or(rest).to_owned();
        }
    }
    panic!("{va:#x} is not mapped in process {pid}");
}

/// Says why a test is skipped, straight to stderr (libtest's capture would hide a skip of a
/// passing test). With `MEMPLANE_NO_SKIP=1` in the environment (CI, which has root, hugepages
/// and DPDK) a skip is a failure instead: nothing is skipped silently there.
#[track_caller]
pub fn skip(reason: &str) {
    use std::io::Write as _;
    if std::env::var_os("MEMPLANE_NO_SKIP").is_some_and(|v| v == "1") {
        panic!("would skip, but MEMPLANE_NO_SKIP=1: {reason}");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED: {reason}");
}

/// Waits (at most [`ANSWER`]) until `read()` returns `want`; returns the last value read.
///
/// For counts the kernel updates only once every holder of a resource has let it go, such as
/// free hugepages after a mapping's fds are closed: a child that another test of the same binary
/// forked or spawned meanwhile holds copies of this process's fds until it execs or exits, so
/// the count can lag for that long. A real leak never settles and is still reported.
pub fn settles_at(want: u64, read: impl Fn() -> u64) -> u64 {
    let start = std::time::Instant::now();
    loop {
        let v = read();
        if v == want || start.elapsed() >= ANSWER {
            return v;
        }
        std::thread::yield_now();
    }
}

/// Stops process `pid` with SIGSTOP and returns once every one of its threads is stopped
/// (state `T` in `/proc/PID/task/TID/stat`): a signal takes effect some time after `kill`
/// returns, on each thread as it next enters the kernel or is interrupted. Panics after
/// [`ANSWER`].
pub fn stop(pid: u32) {
    // SAFETY: kill(2) with a pid the caller spawned and has not reaped, and a valid signal.
    unsafe {
        libc::kill(pid as i32, libc::SIGSTOP);
    }
    let stopped = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .all(|t| {
                let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                // The state follows the parenthesised command name.
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('T'))
            })
    };
    let start = std::time::Instant::now();
    while !stopped() {
        assert!(start.elapsed() < ANSWER, "process {pid} never stopped");
        std::thread::yield_now();
    }
}
