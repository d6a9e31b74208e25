//! A primary with memory and a heap, for the heap's tests.
#![allow(dead_code)]

use std::time::Duration;

use memplane_core::txn::Timeouts;
use memplane_heap::Heap;
use memplane_hugepage::{MemOptions, Memory};
use memplane_testkit::TestDir;
use memplane_unix::{Channel, ChannelConfig, MpChannel, ProcType};

/// Short steps: a test never waits long for a silent peer.
pub fn timeouts() -> Timeouts {
    Timeouts {
        step: Duration::from_secs(2),
        margin: Duration::from_millis(500),
    }
}

/// A primary's heap; the channel stays open as long as this lives.
pub struct Primary {
    pub heap: Heap<MpChannel>,
    pub ch: Channel,
}

/// Opens a primary (channel, memory, heap) in `dir`.
pub fn primary(dir: &TestDir, opts: MemOptions) -> Primary {
    let ch = Channel::open(
        ChannelConfig::new()
            .runtime_dir(dir.path())
            .proc_type(ProcType::Primary),
    )
    .expect("open the primary's channel");
    let (mem, _) = Memory::primary(ch.shared(), dir.path(), "mph", &opts, timeouts())
        .expect("set up the primary's memory");
    let heap = Heap::primary(mem).expect("create the heap");
    Primary { heap, ch }
}
