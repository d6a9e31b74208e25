//! Property tests for the DPDK wire codec (`memplane_core::wire`) and name validation.
//!
//! - every valid message of every ABI survives encode → decode unchanged, and re-encodes to the
//!   same bytes;
//! - arbitrary bytes (any length, exact lengths, mutated valid datagrams) with arbitrary fd counts
//!   and receive flags never make `decode` panic, and whatever it accepts re-encodes to a
//!   datagram that decodes to the same message and differs from the input only in ignored bytes;
//! - `Name::from_bytes` accepts exactly the 1..=63-byte printable-ASCII strings.

use memplane_core::message::{FdCount, Message, MessageError, MsgKind};
use memplane_core::name::Name;
use memplane_core::wire::{self, Abi, Datagram, RecvFlags};
use proptest::collection::vec;
use proptest::prelude::*;

fn abi() -> impl Strategy<Value = Abi> {
    prop::sample::select(Abi::ALL.to_vec())
}

fn kind() -> impl Strategy<Value = MsgKind> {
    prop::sample::select(vec![
        MsgKind::Msg,
        MsgKind::Request,
        MsgKind::Reply,
        MsgKind::Ignore,
    ])
}

fn printable_name() -> impl Strategy<Value = Vec<u8>> {
    vec(0x20u8..=0x7e, 1..=63)
}

fn flags() -> impl Strategy<Value = RecvFlags> {
    (any::<bool>(), any::<bool>()).prop_map(|(truncated, control_truncated)| RecvFlags {
        truncated,
        control_truncated,
    })
}

/// Mostly clean flags, so that inputs reach the datagram checks.
fn mostly_clean_flags() -> impl Strategy<Value = RecvFlags> {
    prop_oneof![
        6 => Just(RecvFlags::default()),
        1 => flags(),
    ]
}

/// An ABI and a valid message for it, with an fd count within its limit.
fn valid_message() -> impl Strategy<Value = (Abi, MsgKind, Message<FdCount>)> {
    abi().prop_flat_map(|abi| {
        (
            Just(abi),
            kind(),
            printable_name(),
            vec(any::<u8>(), 0..=256),
            0..=abi.max_fds(),
        )
            .prop_map(|(abi, kind, name, param, fds)| {
                let name = Name::from_bytes(&name).unwrap();
                let param = memplane_core::Param::new(&param).unwrap();
                let m = Message::from_parts(name, param, FdCount(fds)).unwrap();
                (abi, kind, m)
            })
    })
}

/// Checks what `decode` accepted from `input`: the canonical re-encoding decodes to the same
/// message, and equals `input` except in the bytes the decoder ignores, which it zeroes.
fn check_accepted(abi: Abi, input: &[u8], kind: MsgKind, m: &Message<FdCount>) {
    let d = Datagram::encode(abi, kind, m).expect("an accepted message re-encodes");
    let canon = d.as_bytes();
    assert_eq!(canon.len(), input.len());
    let again = wire::decode(abi, canon, FdCount(m.num_fds()), RecvFlags::default())
        .expect("a canonical datagram decodes");
    assert_eq!(again.0, kind);
    assert_eq!(&again.1, m);
    assert_eq!(
        Datagram::encode(abi, again.0, &again.1).unwrap().as_bytes(),
        canon
    );

    let l = abi.layout();
    let name_used = l.name.start..l.name.start + m.name().len() + 1; // with its NUL
    let param_used = l.param.start..l.param.start + m.param().len();
    for (i, (&got, &want)) in input.iter().zip(canon).enumerate() {
        let defined = l.kind.contains(&i)
            || name_used.contains(&i)
            || l.len_param.contains(&i)
            || l.num_fds.contains(&i)
            || param_used.contains(&i);
        if defined {
            assert_eq!(got, want, "{abi}: defined byte {i} changed");
        } else {
            assert_eq!(want, 0, "{abi}: ignored byte {i} not zeroed");
        }
    }
}

/// Decodes and, on success, checks the round-trip properties; never expected to panic.
fn decode_any(abi: Abi, bytes: &[u8], fds: usize, flags: RecvFlags) {
    if let Ok((kind, m)) = wire::decode(abi, bytes, FdCount(fds), flags) {
        assert!(!flags.truncated && !flags.control_truncated);
        assert_eq!(m.num_fds(), fds);
        check_accepted(abi, bytes, kind, &m);
    }
}

/// Random bytes of exactly one ABI's length, with the header optionally forced into range so the
/// decoder gets past its first checks: a kind 0..=3, a NUL somewhere in the name, a len_param
/// 0..=256 and an fd count the ABI allows.
fn datagram_shaped() -> impl Strategy<Value = (Abi, Vec<u8>, usize)> {
    (abi(), any::<bool>(), any::<bool>()).prop_flat_map(|(abi, exact_len_of_self, fix)| {
        let len = if exact_len_of_self {
            abi.datagram_len()
        } else {
            // The other length: 332 <-> 340.
            672 - abi.datagram_len()
        };
        (
            Just(abi),
            vec(any::<u8>(), len),
            Just(fix),
            0..4i32,
            0..64usize,
            0..=256i32,
            0..=abi.max_fds(),
        )
            .prop_map(|(abi, mut b, fix, code, nul, len_param, fds)| {
                let l = abi.layout();
                if fix && b.len() == l.len {
                    b[l.kind.clone()].copy_from_slice(&code.to_ne_bytes());
                    b[l.name.start + nul] = 0;
                    // Make the name printable so that some of these decode.
                    for c in &mut b[l.name.start..l.name.start + nul] {
                        *c = 0x20 + *c % 0x5f;
                    }
                    b[l.len_param.clone()].copy_from_slice(&len_param.to_ne_bytes());
                    b[l.num_fds.clone()].copy_from_slice(&(fds as i32).to_ne_bytes());
                }
                (abi, b, fds)
            })
    })
}

/// A valid datagram with a few bytes overwritten.
fn mutated_valid() -> impl Strategy<Value = (Abi, Vec<u8>, usize)> {
    (
        valid_message(),
        vec((0..340usize, any::<u8>()), 1..=4),
        prop_oneof![3 => Just(None), 1 => (0..=254usize).prop_map(Some)],
    )
        .prop_map(|((abi, kind, m), edits, fds)| {
            let mut b = Datagram::encode(abi, kind, &m).unwrap().as_bytes().to_vec();
            for (at, v) in edits {
                let at = at % b.len();
                b[at] = v;
            }
            (abi, b, fds.unwrap_or(m.num_fds()))
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// (a) decode(encode(m)) == m for every valid message of every ABI, and re-encoding the
    /// decoded message gives identical bytes.
    #[test]
    fn round_trip((abi, kind, m) in valid_message()) {
        let d = Datagram::encode(abi, kind, &m).unwrap();
        prop_assert_eq!(d.as_bytes().len(), abi.datagram_len());
        let (k, back) =
            wire::decode(abi, d.as_bytes(), FdCount(m.num_fds()), RecvFlags::default()).unwrap();
        prop_assert_eq!(k, kind);
        prop_assert_eq!(&back, &m);
        let again = Datagram::encode(abi, k, &back).unwrap();
        prop_assert_eq!(again.as_bytes(), d.as_bytes());

        // `wire::encode` into a larger buffer agrees with `Datagram`.
        let mut buf = [0xccu8; 400];
        let n = wire::encode(abi, kind, &m, &mut buf).unwrap();
        prop_assert_eq!(&buf[..n], d.as_bytes());
        prop_assert!(buf[n..].iter().all(|&b| b == 0xcc));

        // The other layout never accepts it.
        for other in Abi::ALL {
            if other.datagram_len() != abi.datagram_len() {
                prop_assert!(
                    wire::decode(other, d.as_bytes(), FdCount(m.num_fds()), RecvFlags::default())
                        .is_err()
                );
            }
        }
        check_accepted(abi, d.as_bytes(), kind, &m);
    }

    /// (b) Arbitrary bytes of any length 0..=400: no panic for any ABI; anything accepted
    /// round-trips.
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in vec(any::<u8>(), 0..=400),
        fds in 0..=300usize,
        flags in flags(),
    ) {
        for abi in Abi::ALL {
            decode_any(abi, &bytes, fds, flags);
        }
    }

    /// (b) Random content of exactly 332 or 340 bytes, raw or with an in-range header.
    #[test]
    fn datagram_sized_bytes_never_panic(
        (abi, bytes, fds) in datagram_shaped(),
        fds_delta in prop_oneof![4 => Just(0usize), 1 => 0..=3usize],
        flags in mostly_clean_flags(),
    ) {
        decode_any(abi, &bytes, fds + fds_delta, flags);
        for other in Abi::ALL {
            decode_any(other, &bytes, fds, flags);
        }
    }

    /// (b) Valid datagrams with a few bytes changed.
    #[test]
    fn mutated_datagrams_never_panic(
        (abi, bytes, fds) in mutated_valid(),
        flags in mostly_clean_flags(),
    ) {
        decode_any(abi, &bytes, fds, flags);
    }

    /// (c) `Name::from_bytes` accepts exactly 1..=63 bytes of printable ASCII, and reports the
    /// right reason otherwise.
    #[test]
    fn name_validation(b in prop_oneof![
        vec(any::<u8>(), 0..=80),
        vec(0x20u8..=0x7e, 0..=80),
        (vec(0x20u8..=0x7e, 1..=70), any::<prop::sample::Index>(), any::<u8>())
            .prop_map(|(mut v, i, c)| { let i = i.index(v.len()); v[i] = c; v }),
    ]) {
        let valid = (1..=63).contains(&b.len()) && b.iter().all(|&c| (0x20..=0x7e).contains(&c));
        match Name::from_bytes(&b) {
            Ok(n) => {
                prop_assert!(valid, "accepted {:?}", b);
                prop_assert_eq!(n.as_bytes(), &b[..]);
                prop_assert_eq!(n.len(), b.len());
                prop_assert_eq!(n.as_str().as_bytes(), &b[..]);
                let f = n.to_field();
                prop_assert_eq!(&f[..b.len()], &b[..]);
                prop_assert!(f[b.len()..].iter().all(|&c| c == 0));
            }
            Err(e) => {
                prop_assert!(!valid, "rejected {:?}: {:?}", b, e);
                let expected = if b.is_empty() {
                    MessageError::EmptyName
                } else if b.len() > 63 {
                    MessageError::NameTooLong { len: b.len() }
                } else {
                    let offset = b.iter().position(|&c| !(0x20..=0x7e).contains(&c)).unwrap();
                    MessageError::NameNotPrintable { offset, byte: b[offset] }
                };
                prop_assert_eq!(e, expected);
            }
        }
        // `Name::new` agrees on valid UTF-8 input.
        if let Ok(s) = core::str::from_utf8(&b) {
            prop_assert_eq!(Name::new(s).is_ok(), valid);
        }
    }
}
