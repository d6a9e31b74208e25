//! Fuzzes the memory-transaction payload decoder (`memplane_core::txn::TxnMsg::decode`) and the
//! coordinator fed with whatever it accepts.
//!
//! The decoder must never panic; whatever it accepts must re-encode to exactly the input bytes
//! (the format has no ignored bytes). Accepted requests are then submitted to a coordinator,
//! whose actions are answered with failures, to check it never panics on any valid request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memplane_core::time::Instant;
use memplane_core::txn::payload::MAX_PAYLOAD_LEN;
use memplane_core::txn::{
    Action, Coordinator, Origin, SyncJob, SyncOutcome, Timeouts, TxnMsg, TxnStatus,
};

fuzz_target!(|data: &[u8]| {
    let _ = SyncJob::decode(data);
    let Ok(msg) = TxnMsg::decode(data) else {
        return;
    };
    let mut buf = [0u8; MAX_PAYLOAD_LEN];
    let n = msg.encode(&mut buf);
    assert_eq!(&buf[..n], data, "accepted payload must re-encode to the same bytes");

    if let TxnMsg::Request { id, req } = msg {
        let mut c: Coordinator<u32, 2> = Coordinator::new(Timeouts::default());
        let t = Instant::from_nanos(1);
        c.submit(Origin::Peer(7), id, req, t);
        c.submit(Origin::Peer(7), id, req, t);
        let mut replies = 0;
        for _ in 0..32 {
            let Some(a) = c.poll_action() else { break };
            match a {
                Action::AllocatePages { id, .. } => {
                    let _ = c.pages_allocated(id, Err(TxnStatus::NoMemory), t);
                }
                Action::FreePages { id, .. } => {
                    let _ = c.pages_freed(id, Ok(()), t);
                }
                Action::BroadcastSync { id, .. } => {
                    let _ = c.sync_done(id, SyncOutcome { sent: 1, ok: 0, failed: 1 }, t);
                }
                Action::BroadcastRollback { id, .. } => {
                    let _ = c.rollback_done(id, SyncOutcome::default(), t);
                }
                Action::Publish { id, .. } => {
                    let _ = c.published(id, Ok(()), t);
                }
                Action::Restore { .. } => {}
                Action::Reply { .. } => replies += 1,
            }
        }
        assert_eq!(replies, 2, "each submission gets exactly one reply");
        assert!(c.is_idle());
    }
});
