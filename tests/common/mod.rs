//! Helpers for tests that start real processes: a unique runtime directory per test, children
//! that are always killed and reaped, and line-by-line reading of a child's output with a
//! timeout (so tests wait for what a process says, never for a fixed time).
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The `memplane` binary under test.
pub fn memplane() -> &'static str {
    env!("CARGO_BIN_EXE_memplane")
}

pub use memplane_testkit::TestDir;

/// A fresh, empty runtime directory `/tmp/mpt-<pid>-<n>`, removed on drop.
pub fn test_dir() -> TestDir {
    TestDir::new("mpt")
}

/// A child process whose stdout is read line by line on a thread (so every wait has a timeout)
/// and whose stderr is collected for failure messages. Dropping it kills it (by pid) and reaps
/// it, whatever happened in the test.
pub struct Proc {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<JoinHandle<()>>,
    reaped: Option<ExitStatus>,
}

impl Proc {
    /// Starts `program` with `args`, with stdin, stdout and stderr piped; `what` names it in
    /// failure messages and in front of each stdout line echoed to the test's stderr.
    pub fn start<S: AsRef<OsStr>>(what: &str, program: impl AsRef<OsStr>, args: &[S]) -> Proc {
        Proc::start_in(what, program, args, None)
    }

    /// [`Proc::start`] in working directory `cwd` (the test's own when `None`).
    pub fn start_in<S: AsRef<OsStr>>(
        what: &str,
        program: impl AsRef<OsStr>,
        args: &[S],
        cwd: Option<&std::path::Path>,
    ) -> Proc {
        let mut cmd = Command::new(program);
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        let mut child = cmd
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let (tx, lines) = channel();
        let tag = what.to_owned();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{tag}] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let stderr_reader = thread::spawn(move || {
            let mut r = BufReader::new(stderr_pipe);
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Proc {
            what: what.to_owned(),
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
            stderr,
            stderr_reader: Some(stderr_reader),
            reaped: None,
        }
    }

    /// Starts `memplane` with `args`; named by the words before the first option
    /// (`memplane mp listen`).
    pub fn memplane(args: &[&str]) -> Proc {
        let words: Vec<&str> = args
            .iter()
            .copied()
            .take_while(|a| !a.starts_with('-'))
            .collect();
        Proc::start(&format!("memplane {}", words.join(" ")), memplane(), args)
    }

    /// The pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process printed so far: its stdout lines and its stderr.
    pub fn report(&self) -> String {
        format!(
            "{} stdout:\n{}\n{} stderr:\n{}",
            self.what,
            self.seen.join("\n"),
            self.what,
            self.stderr.lock().unwrap()
        )
    }

    /// The next stdout line, if one comes before `deadline`; every line read is kept in `seen`.
    fn next_line(&mut self, deadline: Instant) -> Result<String, RecvTimeoutError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = self.lines.recv_timeout(left)?;
        self.seen.push(line.clone());
        Ok(line)
    }

    /// Waits (at most `limit`) for a stdout line for which `want` holds and returns it; panics
    /// on timeout or exit.
    #[track_caller]
    pub fn expect_where(&mut self, want: impl Fn(&str) -> bool, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            match self.next_line(deadline) {
                Ok(line) if want(&line) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!(
                    "timed out after {limit:?} waiting for a line\n{}",
                    self.report()
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "{} closed its stdout before the expected line\n{}",
                    self.what,
                    self.report()
                ),
            }
        }
    }

    /// Waits (at most `limit`) for a line containing `needle`; returns it.
    #[track_caller]
    pub fn expect_line(&mut self, needle: &str, limit: Duration) -> String {
        self.expect_where(|l| l.contains(needle), limit)
    }

    /// Waits (at most `limit`) for the line `line`, exactly.
    #[track_caller]
    pub fn expect_exact(&mut self, line: &str, limit: Duration) {
        self.expect_where(|l| l == line, limit);
    }

    /// Waits for the `ready` line.
    #[track_caller]
    pub fn ready(&mut self, limit: Duration) -> String {
        self.expect_where(|l| l.starts_with("ready"), limit)
    }

    /// Writes one line to the process's stdin.
    #[track_caller]
    pub fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to child stdin");
        stdin.flush().expect("flush child stdin");
    }

    /// Closes stdin, reads stdout to its end and reaps the process; panics if that takes longer
    /// than `limit` (the drop then kills it).
    #[track_caller]
    pub fn finish(&mut self, limit: Duration) -> ExitStatus {
        self.stdin = None;
        let deadline = Instant::now() + limit;
        loop {
            match self.next_line(deadline) {
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{} did not exit within {limit:?}\n{}",
                    self.what,
                    self.report()
                ),
            }
        }
        // Stdout is closed: the process has exited (or closed it on purpose; then wait blocks
        // no longer than its exit).
        let st = self.child.wait().expect("wait for child");
        self.reaped = Some(st);
        // The child is gone, so its stderr is at EOF: collect the rest of it.
        if let Some(t) = self.stderr_reader.take() {
            let _ = t.join();
        }
        st
    }

    /// [`Proc::finish`]es the process and asserts that it exited with status 0.
    #[track_caller]
    pub fn finish_ok(&mut self, limit: Duration) {
        let st = self.finish(limit);
        assert!(
            st.success(),
            "{} exited with {st}\n{}",
            self.what,
            self.report()
        );
    }

    /// Asks the process to stop (SIGTERM), then [`Proc::finish`]es it.
    #[track_caller]
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.finish(limit)
    }

    /// Asks the process to stop (SIGTERM), then [`Proc::finish_ok`]s it.
    #[track_caller]
    pub fn terminate_ok(&mut self, limit: Duration) {
        self.signal(libc::SIGTERM);
        self.finish_ok(limit)
    }

    /// Kills the process with SIGKILL and reaps it.
    #[track_caller]
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        self.reaped = Some(self.child.wait().expect("wait for child"));
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped) and a valid signal.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Everything the process printed on stdout so far, one line per entry.
    pub fn output(&self) -> String {
        self.seen.join("\n")
    }

    /// The last stdout line read so far.
    #[track_caller]
    pub fn last_line(&self) -> &str {
        match self.seen.last() {
            Some(l) => l,
            None => panic!("{} printed nothing\n{}", self.what, self.report()),
        }
    }

    /// Whether a stdout line read so far satisfies `want`.
    pub fn has_line(&self, want: impl Fn(&str) -> bool) -> bool {
        self.seen.iter().any(|l| want(l))
    }

    /// Asserts that the process printed the line `want`, exactly, on stdout (among the lines
    /// read so far).
    #[track_caller]
    pub fn assert_line(&self, want: &str) {
        assert!(
            self.has_line(|l| l == want),
            "no line {want:?}\n{}",
            self.report()
        );
    }

    /// Everything the process printed on stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Number of pidfds the process holds (see [`Proc::fd_count`]).
    pub fn pidfd_count(&self) -> usize {
        self.count_fds(true)
    }

    /// Number of open fds of the process, not counting pidfds (a primary holds one for each
    /// live secondary it knows: their number follows the secondaries that come and go, as
    /// `mp ping` ones do, not what the primary received) nor open directories (a primary reads
    /// its runtime directory and a new secondary's `/proc/PID/fd` on its own, for a moment, at
    /// any time: a count taken then was one too high).
    pub fn fd_count(&self) -> usize {
        self.count_fds(false)
    }

    /// Number of the process's open fds that are pidfds (`pidfds`) or are neither pidfds nor
    /// directories.
    fn count_fds(&self, pidfds: bool) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        let p = e.path();
                        if pidfds {
                            is_pidfd(&p)
                        } else {
                            // One closed since the listing is not counted either.
                            !is_pidfd(&p) && std::fs::metadata(&p).is_ok_and(|m| !m.is_dir())
                        }
                    })
                    .count()
            })
            .unwrap_or(0)
    }
}

/// Whether the fd link at `p` (`/proc/PID/fd/N`) is a pidfd: "anon_inode:[pidfd]", or
/// "pidfd:[N]" where pidfs backs them.
fn is_pidfd(p: &std::path::Path) -> bool {
    std::fs::read_link(p).is_ok_and(|t| {
        let t = t.to_string_lossy();
        t == "anon_inode:[pidfd]" || t.starts_with("pidfd:")
    })
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.reaped.is_none() {
            if let Ok(None) = self.child.try_wait() {
                self.signal(libc::SIGKILL);
            }
            let _ = self.child.wait();
        }
    }
}

/// Runs `memplane` with `args` to completion; returns (exit code, stdout lines, stderr).
pub fn run(args: &[&str]) -> (i32, Vec<String>, String) {
    run_at(None, args)
}

/// [`run`] in working directory `cwd` (the test's own when `None`).
pub fn run_at(cwd: Option<&std::path::Path>, args: &[&str]) -> (i32, Vec<String>, String) {
    let mut cmd = Command::new(memplane());
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    let out = cmd.args(args).output().expect("run memplane");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `memplane` with `args` and `--runtime-dir <dir>` to completion; returns (exit code,
/// stdout lines, stderr).
pub fn run_in(dir: &TestDir, args: &[&str]) -> (i32, Vec<String>, String) {
    let d = dir.arg();
    let mut all = args.to_vec();
    all.extend(["--runtime-dir", &d]);
    run(&all)
}

/// Starts `memplane primary` in `dir` with `extra` options and waits until it is ready.
pub fn primary_with(dir: &TestDir, extra: &[&str]) -> Proc {
    let d = dir.arg();
    let mut args = vec!["--runtime-dir", &d];
    args.extend_from_slice(extra);
    primary_at(None, &args)
}

/// Starts `memplane primary ARGS` in working directory `cwd` (the test's own when `None`) and
/// waits until it is ready.
pub fn primary_at(cwd: Option<&std::path::Path>, args: &[&str]) -> Proc {
    let all: Vec<&str> = std::iter::once("primary")
        .chain(args.iter().copied())
        .collect();
    let mut p = Proc::start_in("memplane primary", memplane(), &all, cwd);
    p.expect_line("primary ready", Duration::from_secs(20));
    p
}

/// Starts `memplane primary` in `dir` and waits until it is ready.
pub fn primary(dir: &TestDir) -> Proc {
    primary_with(dir, &[])
}

/// Ten seconds: generous bound for anything that should take milliseconds.
pub const LONG: Duration = Duration::from_secs(10);
