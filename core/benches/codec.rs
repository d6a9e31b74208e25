//! Throughput of the DPDK wire codec (`memplane_core::wire`) on a full-size message: 63-byte
//! name, 256-byte parameter and the ABI's maximum fd count (as `FdCount`), for each ABI.
//! Measures encode alone, decode alone, and encode followed by decode.

use std::hint::black_box;

use criterion::{Criterion, criterion_main};
use memplane_core::message::{FdCount, Message, MsgKind};
use memplane_core::wire::{self, Abi, MAX_DATAGRAM_LEN, RecvFlags};

fn full_size(abi: Abi) -> Message<FdCount> {
    let name: String = (0..63u8).map(|i| char::from(b'A' + i % 26)).collect();
    let param: Vec<u8> = (0..=255u8).collect();
    Message::new(&name, &param)
        .unwrap()
        .with_fds(FdCount(abi.max_fds()))
        .unwrap()
}

fn codec(c: &mut Criterion) {
    for abi in Abi::ALL {
        let m = full_size(abi);
        let fds = abi.max_fds();
        let mut bytes = [0u8; MAX_DATAGRAM_LEN];
        let len = wire::encode(abi, MsgKind::Request, &m, &mut bytes).unwrap();
        let bytes = &bytes[..len];

        let mut g = c.benchmark_group(format!("codec/{abi}"));
        g.bench_function("encode", |b| {
            let mut out = [0u8; MAX_DATAGRAM_LEN];
            b.iter(|| {
                wire::encode(abi, MsgKind::Request, black_box(&m), black_box(&mut out)).unwrap()
            })
        });
        g.bench_function("decode", |b| {
            b.iter(|| {
                wire::decode(
                    abi,
                    black_box(bytes),
                    FdCount(black_box(fds)),
                    RecvFlags::default(),
                )
                .unwrap()
            })
        });
        g.bench_function("encode+decode", |b| {
            let mut out = [0u8; MAX_DATAGRAM_LEN];
            b.iter(|| {
                let n = wire::encode(abi, MsgKind::Request, black_box(&m), &mut out).unwrap();
                wire::decode(
                    abi,
                    black_box(&out[..n]),
                    FdCount(fds),
                    RecvFlags::default(),
                )
                .unwrap()
            })
        });
        g.finish();
    }
}

// In a private module: `criterion_group!` emits an undocumented `pub fn`.
mod group {
    criterion::criterion_group!(benches, super::codec);
}
criterion_main!(group::benches);
