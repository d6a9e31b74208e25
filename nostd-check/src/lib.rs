//! A `#![no_std]` crate with its own panic handler that links `memplane-core` and instantiates
//! every part of it: codec, registry, pending table and tracker, endpoint, and the transaction
//! coordinator. `.ci/run` builds it for `x86_64-unknown-none`, a target that has no `std` at
//! all, as a static library: if anything in the core reached for `std` or an allocator, that
//! build would fail.
#![no_std]
#![forbid(unsafe_code)]

use core::time::Duration;

use memplane_core::endpoint::{Dispatch, Endpoint, Host};
use memplane_core::message::{FdCount, Message, MsgKind};
use memplane_core::pending::{Inline, Notify, Waiting};
use memplane_core::sync::SpinRawMutex;
use memplane_core::time::Instant;
use memplane_core::tracker::Waiter;
use memplane_core::transport::{SendError, Transport};
use memplane_core::txn::{
    Action, AllocFlags, AllocRequest, Coordinator, MemRequest, Origin, Timeouts, TxnId, TxnMsg,
};
use memplane_core::wire::{Abi, Datagram, RecvFlags, decode};
use memplane_core::{ActionRegistry, Name};

/// A transport with one peer that accepts everything and keeps nothing.
pub struct Sink;

impl Transport for Sink {
    type Peer = u32;
    type Fds = FdCount;
    fn send(&self, _: &u32, _: &[u8], _: &FdCount, _: Instant) -> Result<(), SendError> {
        Ok(())
    }
    fn for_each_peer(&self, f: &mut dyn FnMut(&u32)) -> Result<(), SendError> {
        f(&1);
        Ok(())
    }
}

/// Wakes nobody.
pub struct NoWake;
impl Notify for NoWake {
    fn notify(&self) {}
}

/// Waits by returning the deadline at once.
pub struct Spin;
impl Waiter for Spin {
    type Notify = NoWake;
    fn notifier(&self) -> NoWake {
        NoWake
    }
    fn wait_until(&self, deadline: Instant) -> Instant {
        deadline
    }
}

/// The host types of this check.
pub struct Bare;
impl Host for Bare {
    type Transport = Sink;
    type Handler = u8;
    type Notify = NoWake;
    type Callback = u8;
    type Replies = heapless::Vec<(u32, Message<FdCount>), 4>;
    type RawMutex = SpinRawMutex;
    type Storage = Inline<4, 8>;
}

/// Runs one pass over the core; returns a value that depends on every part.
pub fn exercise() -> u32 {
    let mut score = 0u32;
    let msg = match Message::new("nostd", b"check") {
        Ok(m) => m,
        Err(_) => return 0,
    };
    for abi in Abi::ALL {
        if let Ok(d) = Datagram::encode(abi, MsgKind::Request, &msg)
            && let Ok((k, m)) = decode(abi, d.as_bytes(), FdCount(0), RecvFlags::default())
        {
            score += (k == MsgKind::Request) as u32 + m.param().len() as u32;
        }
    }

    let mut reg: ActionRegistry<u8, 4> = ActionRegistry::new();
    if let Ok(n) = Name::new("a") {
        score += reg.register(n, 1).is_ok() as u32;
    }

    let ep: Endpoint<Bare, 4> = Endpoint::new(Sink, Abi::V25_11);
    if let Ok(n) = Name::new("nostd") {
        let _ = ep.register(n, 7);
    }
    let msg: Message<FdCount> = Message::with_param(*msg.name(), *msg.param_block());
    if let Ok(d) = Datagram::encode(Abi::V25_11, MsgKind::Msg, &msg)
        && let Dispatch::Action { handler, .. } = ep.receive(
            1,
            d.as_bytes(),
            FdCount(0),
            RecvFlags::default(),
            Instant::ZERO,
        )
    {
        score += handler as u32;
    }
    if let Ok(r) = ep.request_sync(&msg, Instant::ZERO, Duration::from_millis(1), &Spin) {
        score += r.nb_sent + r.timed_out as u32;
    }
    if let Ok(s) = ep.request_async(&msg, Instant::ZERO, Duration::from_millis(1), 3) {
        let _ = ep.cancel(s.id);
    }
    let _ = Waiting::<NoWake, u8>::Async(0);

    let mut c: Coordinator<u32, 4> = Coordinator::new(Timeouts::default());
    let req = MemRequest::Alloc(AllocRequest {
        heap: 0,
        node: None,
        page_size: 4096,
        bytes: 4096,
        align: 0,
        flags: AllocFlags::default(),
    });
    c.submit(Origin::Peer(1), TxnId(1), req, Instant::ZERO);
    while let Some(a) = c.poll_action() {
        if let Action::AllocatePages { id, .. } = a {
            let _ = c.pages_allocated(
                id,
                Err(memplane_core::txn::TxnStatus::NoMemory),
                Instant::ZERO,
            );
        }
        score += 1;
    }
    score += TxnMsg::decode(
        TxnMsg::SyncAck {
            id: TxnId(1),
            status: memplane_core::txn::TxnStatus::Ok,
        }
        .to_param()
        .as_slice(),
    )
    .is_ok() as u32;
    score
}

/// The entry point of the static library.
pub extern "C" fn memplane_nostd_check() -> u32 {
    exercise()
}

#[cfg(target_os = "none")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {
        core::hint::spin_loop();
    }
}
