//! Golden byte vectors for the DPDK wire codec (`memplane_core::wire`), one per ABI.
//!
//! The expected datagrams are written out by hand at the literal offsets of each layout (22.11 and
//! 24.11: 332 bytes, name @4; 25.11: 340 bytes, name @8), never produced by the encoder. The tests
//! check encoding byte for byte, decoding of the golden bytes, that the bytes DPDK leaves
//! undefined are ignored when decoding, and that every `DecodeError` / `EncodeError` variant is
//! produced by its own cause.
#![cfg(target_endian = "little")]

use memplane_core::message::{FdCount, Message, MsgKind};
use memplane_core::wire::{self, Abi, Datagram, DecodeError, EncodeError, Layout, RecvFlags};

const NAME: &[u8] = b"mp_malloc_sync";
const PARAM: [u8; 5] = [1, 2, 3, 4, 5];

/// Literal field offsets of one ABI, written independently of `Abi::layout`.
#[derive(Clone, Copy, Debug)]
struct Off {
    len: usize,
    name: usize,
    len_param: usize,
    num_fds: usize,
    param: usize,
}

fn off(abi: Abi) -> Off {
    match abi {
        Abi::V22_11 | Abi::V24_11 => Off {
            len: 332,
            name: 4,
            len_param: 68,
            num_fds: 72,
            param: 76,
        },
        Abi::V25_11 => Off {
            len: 340,
            name: 8,
            len_param: 72,
            num_fds: 76,
            param: 80,
        },
    }
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

/// A datagram built field by field: `kind`, `name`, `len_param`, `num_fds`, then `param`, all
/// little-endian, every other byte zero.
fn build(abi: Abi, kind: i32, name: &[u8], len_param: i32, num_fds: i32, param: &[u8]) -> Vec<u8> {
    let o = off(abi);
    let mut b = vec![0u8; o.len];
    put(&mut b, 0, &kind.to_le_bytes());
    put(&mut b, o.name, name);
    put(&mut b, o.len_param, &len_param.to_le_bytes());
    put(&mut b, o.num_fds, &num_fds.to_le_bytes());
    put(&mut b, o.param, param);
    b
}

/// The reference message: a request "mp_malloc_sync" with param [1, 2, 3, 4, 5] and 2 fds.
fn reference() -> Message<FdCount> {
    Message::new("mp_malloc_sync", &PARAM)
        .unwrap()
        .with_fds(FdCount(2))
        .unwrap()
}

fn golden(abi: Abi) -> Vec<u8> {
    build(abi, 1, NAME, 5, 2, &PARAM)
}

fn dec(abi: Abi, bytes: &[u8], fds: usize) -> Result<(MsgKind, Message<FdCount>), DecodeError> {
    wire::decode(abi, bytes, FdCount(fds), RecvFlags::default())
}

fn encode(abi: Abi, kind: MsgKind, m: &Message<FdCount>) -> Vec<u8> {
    Datagram::encode(abi, kind, m).unwrap().as_bytes().to_vec()
}

#[test]
fn layouts_match_the_literal_offsets() {
    assert_eq!(
        Abi::V22_11.layout(),
        &Layout {
            kind: 0..4,
            name: 4..68,
            len_param: 68..72,
            num_fds: 72..76,
            param: 76..332,
            len: 332
        }
    );
    assert_eq!(Abi::V24_11.layout(), Abi::V22_11.layout());
    assert_eq!(
        Abi::V25_11.layout(),
        &Layout {
            kind: 0..4,
            name: 8..72,
            len_param: 72..76,
            num_fds: 76..80,
            param: 80..336,
            len: 340
        }
    );
    assert_eq!(
        Abi::ALL.map(Abi::datagram_len),
        [332, 332, 340],
        "datagram lengths"
    );
    assert_eq!(Abi::ALL.map(Abi::max_fds), [8, 253, 253], "fd limits");
    assert_eq!(wire::MAX_DATAGRAM_LEN, 340);
}

/// Both `golden(abi)` and the encoding of the reference message are `expected`.
fn assert_golden_is(abi: Abi, expected: &[u8]) {
    assert_eq!(golden(abi), expected, "{abi}: golden");
    assert_eq!(
        encode(abi, MsgKind::Request, &reference()),
        expected,
        "{abi}: encoded"
    );
}

/// The 22.11 golden datagram spelled out completely, as a cross-check of `build`.
#[test]
fn golden_22_11_literal_prefix() {
    let mut expected = [0u8; 332];
    expected[..4].copy_from_slice(&[0x01, 0x00, 0x00, 0x00]);
    expected[4..18].copy_from_slice(&[
        0x6d, 0x70, 0x5f, 0x6d, 0x61, 0x6c, 0x6c, 0x6f, 0x63, 0x5f, 0x73, 0x79, 0x6e, 0x63,
    ]); // "mp_malloc_sync"
    expected[68..72].copy_from_slice(&[0x05, 0x00, 0x00, 0x00]);
    expected[72..76].copy_from_slice(&[0x02, 0x00, 0x00, 0x00]);
    expected[76..81].copy_from_slice(&[0x01, 0x02, 0x03, 0x04, 0x05]);
    assert_golden_is(Abi::V22_11, &expected);
    assert_eq!(golden(Abi::V24_11), expected);
}

/// The 25.11 golden datagram spelled out completely, as a cross-check of `build`.
#[test]
fn golden_25_11_literal_prefix() {
    let mut expected = [0u8; 340];
    expected[..8].copy_from_slice(&[0x01, 0x00, 0x00, 0x00, 0, 0, 0, 0]);
    expected[8..22].copy_from_slice(b"mp_malloc_sync");
    expected[72..76].copy_from_slice(&[0x05, 0x00, 0x00, 0x00]);
    expected[76..80].copy_from_slice(&[0x02, 0x00, 0x00, 0x00]);
    expected[80..85].copy_from_slice(&[0x01, 0x02, 0x03, 0x04, 0x05]);
    assert_golden_is(Abi::V25_11, &expected);
}

#[test]
fn encode_matches_golden_for_each_abi() {
    for abi in Abi::ALL {
        let g = golden(abi);
        assert_eq!(encode(abi, MsgKind::Request, &reference()), g, "{abi}");

        // `wire::encode` into a larger, dirty buffer: it writes exactly the datagram's bytes,
        // zeroing every undefined one, and leaves the rest of the buffer alone.
        let mut buf = [0xa5u8; 400];
        let n = wire::encode(abi, MsgKind::Request, &reference(), &mut buf).unwrap();
        assert_eq!(n, g.len(), "{abi}");
        assert_eq!(&buf[..n], &g[..], "{abi}");
        assert!(
            buf[n..].iter().all(|&b| b == 0xa5),
            "{abi}: wrote past the datagram"
        );

        // Into a buffer of exactly the datagram's length.
        let mut exact = vec![0xffu8; abi.datagram_len()];
        assert_eq!(
            wire::encode(abi, MsgKind::Request, &reference(), &mut exact),
            Ok(g.len())
        );
        assert_eq!(exact, g, "{abi}");
    }
}

#[test]
fn decode_golden_for_each_abi() {
    for abi in Abi::ALL {
        let (kind, m) = dec(abi, &golden(abi), 2).unwrap();
        assert_eq!(kind, MsgKind::Request, "{abi}");
        assert_eq!(m, reference(), "{abi}");
        assert_eq!(m.name().as_bytes(), NAME);
        assert_eq!(m.param(), PARAM);
        assert_eq!(m.num_fds(), 2);
    }
}

#[test]
fn every_kind_code() {
    let kinds = [
        (MsgKind::Msg, 0),
        (MsgKind::Request, 1),
        (MsgKind::Reply, 2),
        (MsgKind::Ignore, 3),
    ];
    for abi in Abi::ALL {
        for (kind, code) in kinds {
            let g = build(abi, code, NAME, 5, 2, &PARAM);
            assert_eq!(encode(abi, kind, &reference()), g, "{abi} {kind:?}");
            assert_eq!(dec(abi, &g, 2).unwrap(), (kind, reference()));
        }
    }
}

/// Largest message: 63-byte name (no room left for anything but the NUL), 256-byte param filling
/// the field, and the ABI's maximum fd count.
#[test]
fn full_size_golden() {
    let name: Vec<u8> = (0..63u8).map(|i| b'!' + i).collect();
    let param: Vec<u8> = (0..=255u8).collect();
    for abi in Abi::ALL {
        let max = abi.max_fds();
        let m = Message::new(core::str::from_utf8(&name).unwrap(), &param)
            .unwrap()
            .with_fds(FdCount(max))
            .unwrap();
        let g = build(abi, 2, &name, 256, max as i32, &param);
        let o = off(abi);
        assert_eq!(g[o.name + 63], 0, "NUL terminator");
        assert_eq!(encode(abi, MsgKind::Reply, &m), g, "{abi}");
        assert_eq!(dec(abi, &g, max).unwrap(), (MsgKind::Reply, m), "{abi}");
    }
}

#[test]
fn minimal_golden() {
    // One-byte name, empty param, no fds: almost all zeros.
    for abi in Abi::ALL {
        let m = Message::new(" ", &[])
            .unwrap()
            .with_fds(FdCount(0))
            .unwrap();
        let g = build(abi, 0, b" ", 0, 0, &[]);
        assert_eq!(g.iter().filter(|&&b| b != 0).count(), 1);
        assert_eq!(encode(abi, MsgKind::Msg, &m), g, "{abi}");
        assert_eq!(dec(abi, &g, 0).unwrap(), (MsgKind::Msg, m), "{abi}");
    }
}

// ---- bytes the decoder must ignore -------------------------------------------------------------

fn assert_decodes_to_reference(abi: Abi, bytes: &[u8], what: &str) {
    assert_eq!(
        dec(abi, bytes, 2),
        Ok((MsgKind::Request, reference())),
        "{abi}: {what}"
    );
}

#[test]
fn garbage_after_name_nul_is_ignored() {
    for abi in Abi::ALL {
        let o = off(abi);
        let mut b = golden(abi);
        // Byte NAME.len() is the NUL; everything after it in the 64-byte field is garbage.
        for (i, c) in b[o.name + NAME.len() + 1..o.name + 64]
            .iter_mut()
            .enumerate()
        {
            *c = 0xff - i as u8;
        }
        assert_decodes_to_reference(abi, &b, "after the name's NUL");
        // Non-printable garbage and further NULs are ignored too.
        b[o.name + 63] = 0;
        b[o.name + 20] = 0x01;
        assert_decodes_to_reference(abi, &b, "control bytes after the name's NUL");
    }
}

#[test]
fn garbage_after_len_param_is_ignored() {
    for abi in Abi::ALL {
        let o = off(abi);
        let mut b = golden(abi);
        b[o.param + PARAM.len()..o.param + 256].fill(0xee);
        assert_decodes_to_reference(abi, &b, "param beyond len_param");
    }
}

#[test]
fn garbage_in_25_11_padding_and_trailer_is_ignored() {
    let abi = Abi::V25_11;
    let mut b = golden(abi);
    put(&mut b, 4, &[0xde, 0xad, 0xbe, 0xef]);
    assert_decodes_to_reference(abi, &b, "padding 4..8");

    let mut b = golden(abi);
    put(&mut b, 336, &[0xff, 0xff, 0xff, 0x7f]);
    assert_decodes_to_reference(abi, &b, "trailing fds[0] 336..340");

    let mut b = golden(abi);
    put(&mut b, 336, &[0x00, 0x00, 0x00, 0x80]);
    assert_decodes_to_reference(abi, &b, "negative trailing fds[0]");
}

#[test]
fn all_ignored_garbage_at_once_reencodes_clean() {
    for abi in Abi::ALL {
        let o = off(abi);
        let mut b = golden(abi);
        if abi == Abi::V25_11 {
            put(&mut b, 4, &[1, 2, 3, 4]);
            put(&mut b, 336, &[5, 6, 7, 8]);
        }
        b[o.name + NAME.len() + 1..o.name + 64].fill(0x41);
        b[o.param + PARAM.len()..o.param + 256].fill(0x99);
        let (kind, m) = dec(abi, &b, 2).unwrap();
        assert_eq!((kind, &m), (MsgKind::Request, &reference()));
        // Re-encoding yields the clean golden bytes, not the garbage.
        assert_eq!(encode(abi, kind, &m), golden(abi), "{abi}");
    }
}

// ---- decode errors ------------------------------------------------------------------------------

#[test]
fn wrong_length() {
    for abi in Abi::ALL {
        let expected = abi.datagram_len();
        let g = golden(abi);
        let mut lens = vec![0, 1, 4, 331, 333, 339, 340, 341, 400, 4096];
        lens.push(if expected == 332 { 340 } else { 332 });
        for got in lens {
            if got == expected {
                continue;
            }
            let mut b = g.clone();
            b.resize(got, 0);
            assert_eq!(
                dec(abi, &b, 2),
                Err(DecodeError::WrongLength { expected, got }),
                "{abi}: {got} bytes"
            );
        }
        // Another ABI's valid datagram is rejected for its length alone.
        for other in Abi::ALL {
            if other.datagram_len() != expected {
                assert_eq!(
                    dec(abi, &golden(other), 2),
                    Err(DecodeError::WrongLength {
                        expected,
                        got: other.datagram_len()
                    })
                );
            }
        }
    }
}

#[test]
fn recv_flags() {
    let truncated = RecvFlags {
        truncated: true,
        control_truncated: false,
    };
    let ctrunc = RecvFlags {
        truncated: false,
        control_truncated: true,
    };
    let both = RecvFlags {
        truncated: true,
        control_truncated: true,
    };
    for abi in Abi::ALL {
        let g = golden(abi);
        let d = |b: &[u8], f| wire::decode(abi, b, FdCount(2), f).map(|_| ());
        assert_eq!(d(&g, truncated), Err(DecodeError::Truncated), "{abi}");
        assert_eq!(d(&g, ctrunc), Err(DecodeError::ControlTruncated), "{abi}");
        assert_eq!(d(&g, both), Err(DecodeError::Truncated), "{abi}");
        // The flags are checked before the length.
        assert_eq!(d(&g[..100], truncated), Err(DecodeError::Truncated));
        assert_eq!(d(&[], ctrunc), Err(DecodeError::ControlTruncated));
        assert_eq!(d(&g, RecvFlags::default()), Ok(()));
    }
}

#[test]
fn unknown_kind() {
    for abi in Abi::ALL {
        for code in [4, 5, -1, i32::MAX, i32::MIN, 0x0100] {
            let b = build(abi, code, NAME, 5, 2, &PARAM);
            assert_eq!(
                dec(abi, &b, 2),
                Err(DecodeError::UnknownKind(code)),
                "{abi}: {code}"
            );
        }
    }
}

#[test]
fn name_not_terminated() {
    for abi in Abi::ALL {
        let b = build(abi, 1, &[b'a'; 64], 5, 2, &PARAM);
        assert_eq!(
            dec(abi, &b, 2),
            Err(DecodeError::NameNotTerminated),
            "{abi}"
        );
        // Even when the byte right after the field (len_param's first byte) is zero.
        let b = build(abi, 1, &[b'z'; 64], 0, 2, &[]);
        assert_eq!(dec(abi, &b, 2), Err(DecodeError::NameNotTerminated));
        // Non-printable and unterminated: the missing NUL is reported.
        let b = build(abi, 1, &[0x80; 64], 5, 2, &PARAM);
        assert_eq!(dec(abi, &b, 2), Err(DecodeError::NameNotTerminated));
    }
}

#[test]
fn empty_name() {
    for abi in Abi::ALL {
        let b = build(abi, 1, &[], 5, 2, &PARAM);
        assert_eq!(dec(abi, &b, 2), Err(DecodeError::EmptyName), "{abi}");
        // A leading NUL with a plausible name after it is still empty.
        let mut name = vec![0u8];
        name.extend_from_slice(NAME);
        let b = build(abi, 1, &name, 5, 2, &PARAM);
        assert_eq!(dec(abi, &b, 2), Err(DecodeError::EmptyName), "{abi}");
    }
}

#[test]
fn name_not_printable() {
    for abi in Abi::ALL {
        for (byte, offset) in [(0x7f, 0), (0x80, 3), (0x1f, 13), (b'\t', 7), (0xff, 62)] {
            let mut name = NAME.to_vec();
            name.resize(63, b'x');
            name[offset] = byte;
            let b = build(abi, 1, &name, 5, 2, &PARAM);
            assert_eq!(
                dec(abi, &b, 2),
                Err(DecodeError::NameNotPrintable { offset, byte }),
                "{abi}: {byte:#04x} at {offset}"
            );
        }
        // The first bad byte is reported.
        let b = build(abi, 1, b"a\x01\x02", 5, 2, &PARAM);
        assert_eq!(
            dec(abi, &b, 2),
            Err(DecodeError::NameNotPrintable {
                offset: 1,
                byte: 0x01
            })
        );
    }
}

#[test]
fn param_len_out_of_range() {
    for abi in Abi::ALL {
        for n in [-1, 257, i32::MIN, i32::MAX, 0x1_0000] {
            let b = build(abi, 1, NAME, n, 2, &PARAM);
            assert_eq!(
                dec(abi, &b, 2),
                Err(DecodeError::ParamLenOutOfRange(n)),
                "{abi}: {n}"
            );
        }
        // The bounds themselves are fine.
        for n in [0, 256] {
            let b = build(abi, 1, NAME, n, 2, &PARAM);
            let (_, m) = dec(abi, &b, 2).unwrap();
            assert_eq!(m.param().len(), n as usize);
        }
    }
}

#[test]
fn fd_count_out_of_range() {
    for abi in Abi::ALL {
        let max = abi.max_fds();
        let beyond = if abi == Abi::V22_11 { 9 } else { 254 };
        assert_eq!(beyond, max + 1);
        for count in [-1, beyond as i32, i32::MIN, i32::MAX] {
            let b = build(abi, 1, NAME, 5, count, &PARAM);
            // The fd set agrees with nothing in particular; the header is rejected first.
            let received = if count < 0 { 0 } else { count as usize };
            assert_eq!(
                dec(abi, &b, received),
                Err(DecodeError::FdCountOutOfRange { count, max }),
                "{abi}: {count}"
            );
        }
        // The maximum itself is fine.
        let b = build(abi, 1, NAME, 5, max as i32, &PARAM);
        assert_eq!(dec(abi, &b, max).unwrap().1.num_fds(), max);
    }
    // 24.11 accepts what 22.11 refuses.
    let b = build(Abi::V24_11, 1, NAME, 5, 9, &PARAM);
    assert!(dec(Abi::V24_11, &b, 9).is_ok());
}

#[test]
fn fd_count_mismatch() {
    for abi in Abi::ALL {
        let g = golden(abi);
        for received in [0, 1, 3, 253] {
            assert_eq!(
                dec(abi, &g, received),
                Err(DecodeError::FdCountMismatch {
                    header: 2,
                    received
                }),
                "{abi}: {received}"
            );
        }
        // Header 0 with fds attached is a mismatch too.
        let b = build(abi, 1, NAME, 5, 0, &PARAM);
        assert_eq!(
            dec(abi, &b, 1),
            Err(DecodeError::FdCountMismatch {
                header: 0,
                received: 1
            })
        );
    }
}

/// The checks run in the documented order: flags, length, kind, name, len_param, num_fds, fd
/// count. A datagram with several faults reports the first.
#[test]
fn check_order() {
    for abi in Abi::ALL {
        let bad_all = build(abi, 9, &[], -1, -1, &[]);
        assert_eq!(dec(abi, &bad_all, 5), Err(DecodeError::UnknownKind(9)));
        let b = build(abi, 1, &[], -1, -1, &[]);
        assert_eq!(dec(abi, &b, 5), Err(DecodeError::EmptyName));
        let b = build(abi, 1, b"ok", -1, -1, &[]);
        assert_eq!(dec(abi, &b, 5), Err(DecodeError::ParamLenOutOfRange(-1)));
        let b = build(abi, 1, b"ok", 0, -1, &[]);
        assert!(matches!(
            dec(abi, &b, 5),
            Err(DecodeError::FdCountOutOfRange { count: -1, .. })
        ));
    }
}

/// One example of each decode error; they must all be different variants.
#[test]
fn decode_errors_are_distinct() {
    let abi = Abi::V22_11;
    let g = golden(abi);
    let flags = |truncated, control_truncated| RecvFlags {
        truncated,
        control_truncated,
    };
    let errs = [
        wire::decode(abi, &g, FdCount(2), flags(true, false)).unwrap_err(),
        wire::decode(abi, &g, FdCount(2), flags(false, true)).unwrap_err(),
        dec(abi, &g[..331], 2).unwrap_err(),
        dec(abi, &build(abi, 4, NAME, 5, 2, &PARAM), 2).unwrap_err(),
        dec(abi, &build(abi, 1, &[b'n'; 64], 5, 2, &PARAM), 2).unwrap_err(),
        dec(abi, &build(abi, 1, &[], 5, 2, &PARAM), 2).unwrap_err(),
        dec(abi, &build(abi, 1, b"\x7f", 5, 2, &PARAM), 2).unwrap_err(),
        dec(abi, &build(abi, 1, NAME, 257, 2, &PARAM), 2).unwrap_err(),
        dec(abi, &build(abi, 1, NAME, 5, 9, &PARAM), 9).unwrap_err(),
        dec(abi, &g, 1).unwrap_err(),
    ];
    for (i, a) in errs.iter().enumerate() {
        assert!(!a.to_string().is_empty());
        for b in &errs[i + 1..] {
            assert_ne!(
                core::mem::discriminant(a),
                core::mem::discriminant(b),
                "{a:?} and {b:?}"
            );
        }
    }
    assert!(matches!(errs[0], DecodeError::Truncated));
    assert!(matches!(errs[1], DecodeError::ControlTruncated));
    assert!(matches!(errs[2], DecodeError::WrongLength { .. }));
    assert!(matches!(errs[3], DecodeError::UnknownKind(_)));
    assert!(matches!(errs[4], DecodeError::NameNotTerminated));
    assert!(matches!(errs[5], DecodeError::EmptyName));
    assert!(matches!(errs[6], DecodeError::NameNotPrintable { .. }));
    assert!(matches!(errs[7], DecodeError::ParamLenOutOfRange(_)));
    assert!(matches!(errs[8], DecodeError::FdCountOutOfRange { .. }));
    assert!(matches!(errs[9], DecodeError::FdCountMismatch { .. }));
}

// ---- encode errors ------------------------------------------------------------------------------

#[test]
fn too_many_fds() {
    let with = |n| {
        Message::new("mp_malloc_sync", &PARAM)
            .unwrap()
            .with_fds(FdCount(n))
            .unwrap()
    };
    let err = EncodeError::TooManyFds {
        abi: Abi::V22_11,
        max: 8,
        count: 9,
    };
    assert_eq!(
        Datagram::encode(Abi::V22_11, MsgKind::Request, &with(9)).unwrap_err(),
        err
    );
    let mut buf = [0x5au8; 340];
    assert_eq!(
        wire::encode(Abi::V22_11, MsgKind::Request, &with(9), &mut buf),
        Err(err)
    );
    assert!(
        buf.iter().all(|&b| b == 0x5a),
        "a failed encode must not write"
    );
    assert!(!err.to_string().is_empty());

    assert_eq!(
        encode(Abi::V22_11, MsgKind::Request, &with(8)),
        build(Abi::V22_11, 1, NAME, 5, 8, &PARAM)
    );
    for abi in [Abi::V24_11, Abi::V25_11] {
        assert_eq!(
            encode(abi, MsgKind::Request, &with(9)),
            build(abi, 1, NAME, 5, 9, &PARAM)
        );
        assert_eq!(
            encode(abi, MsgKind::Request, &with(253)),
            build(abi, 1, NAME, 5, 253, &PARAM)
        );
    }
}

#[test]
fn buffer_too_small() {
    for abi in Abi::ALL {
        let need = abi.datagram_len();
        for got in [0, 1, 331, need - 1] {
            let mut buf = vec![0x77u8; got];
            let err = wire::encode(abi, MsgKind::Request, &reference(), &mut buf).unwrap_err();
            assert_eq!(err, EncodeError::BufferTooSmall { need, got }, "{abi}");
            assert!(
                buf.iter().all(|&b| b == 0x77),
                "a failed encode must not write"
            );
            assert!(!err.to_string().is_empty());
        }
    }
    // The buffer size is checked before the fd count.
    let m = reference().with_fds(FdCount(9)).unwrap();
    assert_eq!(
        wire::encode(Abi::V22_11, MsgKind::Msg, &m, &mut [0u8; 10]),
        Err(EncodeError::BufferTooSmall { need: 332, got: 10 })
    );
}
