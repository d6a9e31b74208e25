//! Fuzzes the DPDK datagram decoder (`memplane_core::wire::decode`).
//!
//! Input layout: byte 0 picks the ABI (`Abi::ALL[b % 3]`) and the receive flags (bit 6:
//! `MSG_TRUNC`, bit 7: `MSG_CTRUNC`); byte 1 is the number of fds that "arrived"; the rest is the
//! datagram. The decoder must never panic, and whatever it accepts must re-encode to a datagram
//! that decodes to the same message and re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memplane_core::message::FdCount;
use memplane_core::wire::{self, Abi, Datagram, RecvFlags};

fuzz_target!(|data: &[u8]| {
    let [sel, fds, datagram @ ..] = data else {
        return;
    };
    let abi = Abi::ALL[usize::from(*sel % 3)];
    let flags = RecvFlags {
        truncated: sel & 0x40 != 0,
        control_truncated: sel & 0x80 != 0,
    };
    let fds = usize::from(*fds);
    let Ok((kind, msg)) = wire::decode(abi, datagram, FdCount(fds), flags) else {
        return;
    };
    assert!(!flags.truncated && !flags.control_truncated);
    assert_eq!(datagram.len(), abi.datagram_len());
    assert_eq!(msg.num_fds(), fds);

    let canon = Datagram::encode(abi, kind, &msg).expect("an accepted message re-encodes");
    let (kind2, msg2) = wire::decode(abi, canon.as_bytes(), FdCount(fds), RecvFlags::default())
        .expect("a re-encoded message decodes");
    assert_eq!(kind2, kind);
    assert_eq!(msg2, msg);
    let again = Datagram::encode(abi, kind2, &msg2).expect("re-encodes again");
    assert_eq!(again.as_bytes(), canon.as_bytes());
});
