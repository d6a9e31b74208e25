//! The VFIO DMA mapper: the fake container, the real ioctl layer without a device, the ABI
//! against `<linux/vfio.h>`, and the IPC payload codec.

use std::collections::HashMap;
use std::mem::offset_of;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use memplane_hugepage::vfio::*;

const PAGE: u64 = 2 << 20; // 2 MiB

fn map(vaddr: u64, iova: u64, len: u64) -> DmaCall {
    DmaCall::Map { vaddr, iova, len }
}

fn unmap(iova: u64, len: u64) -> DmaCall {
    DmaCall::Unmap { iova, len }
}

// ---------------------------------------------------------------------------------------------
// The fake container
// ---------------------------------------------------------------------------------------------

#[test]
fn fake_map_unmap_sequence() {
    let c = FakeContainer::new();
    let va = 0x7f00_0000_0000;
    for i in 0..4 {
        c.map(va + i * PAGE, 0x1_0000_0000 + i * PAGE, PAGE)
            .unwrap();
    }
    assert_eq!(c.mapped_bytes(), 4 * PAGE);
    assert_eq!(c.mappings().len(), 4);
    assert_eq!(c.mappings()[1], (0x1_0000_0000 + PAGE, va + PAGE, PAGE));
    c.unmap(0x1_0000_0000 + PAGE, PAGE).unwrap();
    c.unmap(0x1_0000_0000, PAGE).unwrap();
    assert_eq!(c.mapped_bytes(), 2 * PAGE);
    c.unmap(0x1_0000_0000 + 3 * PAGE, PAGE).unwrap();
    c.unmap(0x1_0000_0000 + 2 * PAGE, PAGE).unwrap();
    assert_eq!(c.mapped_bytes(), 0);
    assert!(c.mappings().is_empty());
    assert_eq!(
        c.calls(),
        vec![
            map(va, 0x1_0000_0000, PAGE),
            map(va + PAGE, 0x1_0000_0000 + PAGE, PAGE),
            map(va + 2 * PAGE, 0x1_0000_0000 + 2 * PAGE, PAGE),
            map(va + 3 * PAGE, 0x1_0000_0000 + 3 * PAGE, PAGE),
            unmap(0x1_0000_0000 + PAGE, PAGE),
            unmap(0x1_0000_0000, PAGE),
            unmap(0x1_0000_0000 + 3 * PAGE, PAGE),
            unmap(0x1_0000_0000 + 2 * PAGE, PAGE),
        ]
    );
}

#[test]
fn fake_identical_map_is_ok() {
    let c = FakeContainer::new();
    c.map(0x4000_0000, 0x4000_0000, PAGE).unwrap();
    c.map(0x4000_0000, 0x4000_0000, PAGE).unwrap();
    assert_eq!(c.mapped_bytes(), PAGE);
    assert_eq!(c.mappings().len(), 1);
    assert_eq!(c.calls().len(), 2);
    // One unmap removes it: the second map did not stack.
    c.unmap(0x4000_0000, PAGE).unwrap();
    assert_eq!(c.mapped_bytes(), 0);
}

#[test]
fn fake_overlap_rejected() {
    let c = FakeContainer::new();
    let (va, iova) = (0x7000_0000, 0x1000_0000);
    c.map(va, iova, 2 * PAGE).unwrap();
    let cases = [
        (va, iova, PAGE),                       // same start, shorter
        (va, iova, 4 * PAGE),                   // same start, longer
        (va + PAGE, iova + PAGE, 2 * PAGE),     // overlaps the end
        (va - PAGE, iova - PAGE, 2 * PAGE),     // overlaps the start
        (va - PAGE, iova - PAGE, 4 * PAGE),     // contains it
        (va + PAGE, iova + PAGE, PAGE),         // inside it
        (va + 0x10_0000, iova, 2 * PAGE),       // same IOVA range, other vaddr
        (va, iova + 0x1000, 2 * PAGE - 0x1000), // starts one 4K page in
    ];
    for (v, i, l) in cases {
        assert_eq!(
            c.map(v, i, l),
            Err(DmaError::Overlap { iova: i, len: l }),
            "map({v:#x}, {i:#x}, {l:#x})"
        );
    }
    assert_eq!(c.mappings(), vec![(iova, va, 2 * PAGE)]);
    // Adjacent ranges do not overlap.
    c.map(va + 2 * PAGE, iova + 2 * PAGE, PAGE).unwrap();
    c.map(va - PAGE, iova - PAGE, PAGE).unwrap();
    assert_eq!(c.mapped_bytes(), 4 * PAGE);
    assert_eq!(c.calls().len(), 1 + cases.len() + 2);
}

#[test]
fn fake_unmap_size_mismatch() {
    let c = FakeContainer::new();
    // Nothing mapped there.
    assert_eq!(
        c.unmap(0x1000_0000, PAGE),
        Err(DmaError::SizeMismatch {
            asked: PAGE,
            unmapped: 0
        })
    );

    // Splitting a mapping: nothing removed.
    c.map(0x7000_0000, 0x1000_0000, 2 * PAGE).unwrap();
    for (i, l) in [
        (0x1000_0000, PAGE),
        (0x1000_0000 + PAGE, PAGE),
        (0x1000_0000 + PAGE, 2 * PAGE),
        (0x1000_0000 - PAGE, 2 * PAGE),
    ] {
        assert_eq!(
            c.unmap(i, l),
            Err(DmaError::SizeMismatch {
                asked: l,
                unmapped: 0
            }),
            "unmap({i:#x}, {l:#x})"
        );
    }
    assert_eq!(c.mapped_bytes(), 2 * PAGE);

    // A larger range than mapped: the mapping inside goes (as in the kernel), and the call
    // reports the difference.
    assert_eq!(
        c.unmap(0x1000_0000 - PAGE, 4 * PAGE),
        Err(DmaError::SizeMismatch {
            asked: 4 * PAGE,
            unmapped: 2 * PAGE
        })
    );
    assert_eq!(c.mapped_bytes(), 0);

    // Adjacent mappings covered exactly by one unmap: fine.
    c.map(0x7000_0000, 0x1000_0000, PAGE).unwrap();
    c.map(0x7000_0000 + PAGE, 0x1000_0000 + PAGE, PAGE).unwrap();
    c.unmap(0x1000_0000, 2 * PAGE).unwrap();
    assert_eq!(c.mapped_bytes(), 0);
}

#[test]
fn fake_injected_failures() {
    let c = FakeContainer::new();
    c.fail_next_map();
    assert_eq!(
        c.map(0x7000_0000, 0x1000_0000, PAGE),
        Err(DmaError::Injected)
    );
    assert_eq!(c.mapped_bytes(), 0);
    // Only the next one.
    c.map(0x7000_0000, 0x1000_0000, PAGE).unwrap();

    c.fail_next_unmap();
    assert_eq!(c.unmap(0x1000_0000, PAGE), Err(DmaError::Injected));
    assert_eq!(
        c.mapped_bytes(),
        PAGE,
        "an injected unmap failure changes nothing"
    );
    c.unmap(0x1000_0000, PAGE).unwrap();
    assert_eq!(c.mapped_bytes(), 0);

    // They add up, and each kind only affects its own calls.
    c.fail_next_map();
    c.fail_next_map();
    c.fail_next_unmap();
    assert_eq!(
        c.map(0x7000_0000, 0x1000_0000, PAGE),
        Err(DmaError::Injected)
    );
    assert_eq!(
        c.map(0x7000_0000, 0x1000_0000, PAGE),
        Err(DmaError::Injected)
    );
    c.map(0x7000_0000, 0x1000_0000, PAGE).unwrap();
    assert_eq!(c.unmap(0x1000_0000, PAGE), Err(DmaError::Injected));
    c.unmap(0x1000_0000, PAGE).unwrap();
    assert_eq!(c.mapped_bytes(), 0);

    // Failed calls are recorded too.
    let calls = c.calls();
    assert_eq!(calls.len(), 9);
    assert_eq!(calls[0], map(0x7000_0000, 0x1000_0000, PAGE));
    assert_eq!(calls[2], unmap(0x1000_0000, PAGE));
}

#[test]
fn fake_invalid_ranges() {
    let c = FakeContainer::new();
    let bad_maps = [
        (0x7000_0000, 0x1000_0000, 0),         // empty
        (0x7000_0000, 0x1000_0000, 100),       // not a page multiple
        (0x7000_0001, 0x1000_0000, PAGE),      // vaddr misaligned
        (0x7000_0000, 0x1000_0800, PAGE),      // iova misaligned
        (0x7000_0000, u64::MAX - 0xfff, PAGE), // iova wraps
        (u64::MAX - 0xfff, 0x1000_0000, PAGE), // vaddr wraps
    ];
    for (v, i, l) in bad_maps {
        assert_eq!(
            c.map(v, i, l),
            Err(DmaError::InvalidRange {
                vaddr: Some(v),
                iova: i,
                len: l
            })
        );
    }
    assert_eq!(
        c.unmap(0x1000_0000, 0),
        Err(DmaError::InvalidRange {
            vaddr: None,
            iova: 0x1000_0000,
            len: 0
        })
    );
    assert_eq!(c.mapped_bytes(), 0);
    // A range ending just below 2^64 is fine; one ending at 2^64 does not fit.
    let top = u64::MAX - PAGE - 0xfff;
    c.map(0x7000_0000, top, PAGE).unwrap();
    assert!(c.map(0x7000_0000, top + 0x1000, PAGE).is_err());
}

#[test]
fn fake_from_threads_behind_dyn() {
    let c = Arc::new(FakeContainer::new());
    let m: Arc<dyn DmaMapper> = c.clone();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let m = m.clone();
            std::thread::spawn(move || {
                for i in 0..64u64 {
                    let off = (t * 64 + i) * PAGE;
                    m.map(0x7f00_0000_0000 + off, off, PAGE).unwrap();
                }
                for i in 0..64u64 {
                    let off = (t * 64 + i) * PAGE;
                    if i % 2 == 0 {
                        m.unmap(off, PAGE).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(c.mapped_bytes(), 8 * 32 * PAGE);
    assert_eq!(c.calls().len(), 8 * (64 + 32));
    // Through a reference and a box as well.
    let r: &dyn DmaMapper = &*c;
    r.unmap(PAGE, PAGE).unwrap();
    let b: Box<dyn DmaMapper> = Box::new(c.clone());
    b.unmap(3 * PAGE, PAGE).unwrap();
    assert_eq!(c.mapped_bytes(), (8 * 32 - 2) * PAGE);
}

/// An ioctl request number as a `u64` (`libc::Ioctl` is `c_ulong` on glibc, `c_int` on musl).
#[allow(clippy::unnecessary_cast)]
fn req(r: libc::Ioctl) -> u64 {
    r as u64
}

// ---------------------------------------------------------------------------------------------
// The real ioctl layer, without a device
// ---------------------------------------------------------------------------------------------

#[test]
fn open_without_vfio() {
    if !Path::new(VFIO_CONTAINER_PATH).exists() {
        let e = VfioContainer::open().unwrap_err();
        assert_eq!(e, DmaError::NoVfio);
        let msg = e.to_string();
        assert!(msg.contains("VFIO is not available here"), "{msg}");
        println!("{VFIO_CONTAINER_PATH} is absent: open() -> {msg}");
        return;
    }
    match VfioContainer::open() {
        Ok(c) => {
            assert_eq!(c.api_version().unwrap(), VFIO_API_VERSION);
            let t1 = c.check_extension(VFIO_TYPE1_IOMMU).unwrap();
            let t1v2 = c.check_extension(VFIO_TYPE1V2_IOMMU).unwrap();
            assert_eq!(c.iommu_type(), None);
            println!(
                "SKIPPED: {VFIO_CONTAINER_PATH} exists (API version {VFIO_API_VERSION}, type1 \
                 {t1}, type1v2 {t1v2}); SET_IOMMU and MAP/UNMAP_DMA need a device bound to \
                 vfio-pci and are not run here"
            );
        }
        Err(e @ DmaError::Open { .. }) => {
            println!("SKIPPED: {VFIO_CONTAINER_PATH} exists but cannot be opened: {e}");
        }
        Err(e) => panic!("open(): {e}"),
    }
}

#[test]
fn open_path_errors() {
    assert_eq!(
        VfioContainer::open_path("/nonexistent/vfio/vfio").unwrap_err(),
        DmaError::NoVfio
    );
    // A device that is not VFIO: the open works, the version ioctl is refused.
    assert_eq!(
        VfioContainer::open_path("/dev/null").unwrap_err(),
        DmaError::Ioctl {
            op: "VFIO_GET_API_VERSION",
            errno: libc::ENOTTY
        }
    );
}

fn non_vfio_fds() -> Vec<(&'static str, OwnedFd)> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .unwrap();
    let memfd =
        rustix::fs::memfd_create("memplane-vfio-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    vec![("/dev/null", null.into()), ("memfd", memfd)]
}

fn assert_ioctl_refused(what: &str, r: Result<impl std::fmt::Debug, DmaError>, op: &str) {
    match r {
        Err(DmaError::Ioctl { op: o, errno }) => {
            assert_eq!(o, op, "{what}");
            assert!(
                errno == libc::ENOTTY || errno == libc::EINVAL,
                "{what}: {op} errno {errno}"
            );
        }
        other => panic!("{what}: {op}: expected an ioctl error, got {other:?}"),
    }
}

#[test]
fn ioctls_reach_the_kernel_on_a_non_vfio_fd() {
    // A real mapping, so that nothing but the fd type can make the calls fail.
    let len = 4 * 4096usize;
    let buf = vec![0u8; 2 * len];
    let vaddr = (buf.as_ptr() as u64 + 4095) & !4095;
    for (what, fd) in non_vfio_fds() {
        let mut c = VfioContainer::from_fd(fd);
        assert_eq!(c.iommu_type(), None);
        assert_ioctl_refused(what, c.api_version(), "VFIO_GET_API_VERSION");
        assert_ioctl_refused(
            what,
            c.check_extension(VFIO_TYPE1V2_IOMMU),
            "VFIO_CHECK_EXTENSION",
        );
        assert_ioctl_refused(what, c.set_iommu(IommuType::Type1v2), "VFIO_SET_IOMMU");
        assert_eq!(
            c.iommu_type(),
            None,
            "{what}: a failed SET_IOMMU sets nothing"
        );
        assert_ioctl_refused(what, c.map(vaddr, vaddr, len as u64), "VFIO_IOMMU_MAP_DMA");
        assert_ioctl_refused(what, c.unmap(vaddr, len as u64), "VFIO_IOMMU_UNMAP_DMA");
        // Through the trait object as well.
        let m: &dyn DmaMapper = &c;
        assert_ioctl_refused(what, m.map(vaddr, 0x1000_0000, 4096), "VFIO_IOMMU_MAP_DMA");
        // Invalid ranges are refused before any ioctl.
        assert_eq!(
            c.map(vaddr + 1, vaddr, 4096),
            Err(DmaError::InvalidRange {
                vaddr: Some(vaddr + 1),
                iova: vaddr,
                len: 4096
            })
        );
        assert_eq!(
            c.unmap(vaddr, 0),
            Err(DmaError::InvalidRange {
                vaddr: None,
                iova: vaddr,
                len: 0
            })
        );
        let e = c.map(vaddr, vaddr, 4096).unwrap_err().to_string();
        assert!(e.starts_with("VFIO_IOMMU_MAP_DMA: "), "{e}");
        // The fd comes back out.
        let _fd: OwnedFd = c.into();
    }
    drop(buf);
}

#[test]
fn iommu_type_numbers() {
    assert_eq!(IommuType::Type1.raw(), 1);
    assert_eq!(IommuType::Type1v2.raw(), 3);
    for t in [IommuType::Type1, IommuType::Type1v2] {
        assert_eq!(IommuType::from_raw(t.raw()), Some(t));
    }
    assert_eq!(IommuType::from_raw(8), None); // VFIO_NOIOMMU_IOMMU
}

#[test]
fn rust_layouts() {
    assert_eq!(size_of::<VfioIommuType1DmaMap>(), 32);
    assert_eq!(size_of::<VfioIommuType1DmaUnmap>(), 24);
    let m = VfioIommuType1DmaMap::new(1, 2, 3);
    assert_eq!((m.argsz, m.flags), (32, 3));
    let u = VfioIommuType1DmaUnmap::new(2, 3);
    assert_eq!((u.argsz, u.flags), (24, 0));
    if cfg!(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "riscv64"
    )) {
        // _IO(';', 100 + n) with _IOC_NONE = 0: (0x3B << 8) | (100 + n).
        assert_eq!(req(VFIO_GET_API_VERSION), 0x3B64);
        assert_eq!(req(VFIO_CHECK_EXTENSION), 0x3B65);
        assert_eq!(req(VFIO_SET_IOMMU), 0x3B66);
        assert_eq!(req(VFIO_IOMMU_MAP_DMA), 0x3B71);
        assert_eq!(req(VFIO_IOMMU_UNMAP_DMA), 0x3B72);
    }
}

// ---------------------------------------------------------------------------------------------
// The ABI against <linux/vfio.h>
// ---------------------------------------------------------------------------------------------

const HEADER_PROBE: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <linux/vfio.h>
#define P(name, v) printf("%s=%llu\n", name, (unsigned long long)(v))
int main(void) {
    P("VFIO_TYPE", VFIO_TYPE);
    P("VFIO_BASE", VFIO_BASE);
    P("VFIO_API_VERSION", VFIO_API_VERSION);
    P("VFIO_TYPE1_IOMMU", VFIO_TYPE1_IOMMU);
    P("VFIO_TYPE1v2_IOMMU", VFIO_TYPE1v2_IOMMU);
    P("VFIO_DMA_MAP_FLAG_READ", VFIO_DMA_MAP_FLAG_READ);
    P("VFIO_DMA_MAP_FLAG_WRITE", VFIO_DMA_MAP_FLAG_WRITE);
    P("VFIO_GET_API_VERSION", VFIO_GET_API_VERSION);
    P("VFIO_CHECK_EXTENSION", VFIO_CHECK_EXTENSION);
    P("VFIO_SET_IOMMU", VFIO_SET_IOMMU);
    P("VFIO_IOMMU_MAP_DMA", VFIO_IOMMU_MAP_DMA);
    P("VFIO_IOMMU_UNMAP_DMA", VFIO_IOMMU_UNMAP_DMA);
    P("sizeof map", sizeof(struct vfio_iommu_type1_dma_map));
    P("offsetof map.argsz", offsetof(struct vfio_iommu_type1_dma_map, argsz));
    P("offsetof map.flags", offsetof(struct vfio_iommu_type1_dma_map, flags));
    P("offsetof map.vaddr", offsetof(struct vfio_iommu_type1_dma_map, vaddr));
    P("offsetof map.iova", offsetof(struct vfio_iommu_type1_dma_map, iova));
    P("offsetof map.size", offsetof(struct vfio_iommu_type1_dma_map, size));
    P("sizeof unmap", sizeof(struct vfio_iommu_type1_dma_unmap));
    P("offsetof unmap.argsz", offsetof(struct vfio_iommu_type1_dma_unmap, argsz));
    P("offsetof unmap.flags", offsetof(struct vfio_iommu_type1_dma_unmap, flags));
    P("offsetof unmap.iova", offsetof(struct vfio_iommu_type1_dma_unmap, iova));
    P("offsetof unmap.size", offsetof(struct vfio_iommu_type1_dma_unmap, size));
    return 0;
}
"#;

fn rust_abi() -> Vec<(&'static str, u64)> {
    type Map = VfioIommuType1DmaMap;
    type Unmap = VfioIommuType1DmaUnmap;
    vec![
        ("VFIO_TYPE", VFIO_TYPE.into()),
        ("VFIO_BASE", VFIO_BASE.into()),
        ("VFIO_API_VERSION", VFIO_API_VERSION as u64),
        ("VFIO_TYPE1_IOMMU", VFIO_TYPE1_IOMMU.into()),
        ("VFIO_TYPE1v2_IOMMU", VFIO_TYPE1V2_IOMMU.into()),
        ("VFIO_DMA_MAP_FLAG_READ", VFIO_DMA_MAP_FLAG_READ.into()),
        ("VFIO_DMA_MAP_FLAG_WRITE", VFIO_DMA_MAP_FLAG_WRITE.into()),
        ("VFIO_GET_API_VERSION", req(VFIO_GET_API_VERSION)),
        ("VFIO_CHECK_EXTENSION", req(VFIO_CHECK_EXTENSION)),
        ("VFIO_SET_IOMMU", req(VFIO_SET_IOMMU)),
        ("VFIO_IOMMU_MAP_DMA", req(VFIO_IOMMU_MAP_DMA)),
        ("VFIO_IOMMU_UNMAP_DMA", req(VFIO_IOMMU_UNMAP_DMA)),
        ("sizeof map", size_of::<Map>() as u64),
        ("offsetof map.argsz", offset_of!(Map, argsz) as u64),
        ("offsetof map.flags", offset_of!(Map, flags) as u64),
        ("offsetof map.vaddr", offset_of!(Map, vaddr) as u64),
        ("offsetof map.iova", offset_of!(Map, iova) as u64),
        ("offsetof map.size", offset_of!(Map, size) as u64),
        ("sizeof unmap", size_of::<Unmap>() as u64),
        ("offsetof unmap.argsz", offset_of!(Unmap, argsz) as u64),
        ("offsetof unmap.flags", offset_of!(Unmap, flags) as u64),
        ("offsetof unmap.iova", offset_of!(Unmap, iova) as u64),
        ("offsetof unmap.size", offset_of!(Unmap, size) as u64),
    ]
}

#[test]
fn abi_matches_linux_vfio_h() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vfio-header-probe");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("probe.c");
    let exe = dir.join("probe");
    std::fs::write(&src, HEADER_PROBE).unwrap();
    let out = match Command::new("gcc")
        .arg("-std=c11")
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("SKIPPED: no gcc, <linux/vfio.h> not checked");
            return;
        }
        Err(e) => panic!("running gcc: {e}"),
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("linux/vfio.h") {
            println!(
                "SKIPPED: <linux/vfio.h> is not installed (apt-get install linux-libc-dev): {err}"
            );
            return;
        }
        panic!("compiling the header probe failed:\n{err}");
    }
    let out = Command::new(&exe).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let c: HashMap<&str, u64> = text
        .lines()
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k, v.parse().unwrap())
        })
        .collect();
    let mut bad = Vec::new();
    for (k, v) in rust_abi() {
        let h = c[k];
        println!("{k:<24} header {h:#8x}  rust {v:#8x}");
        if h != v {
            bad.push(k);
        }
    }
    assert!(bad.is_empty(), "differ from <linux/vfio.h>: {bad:?}");
    assert_eq!(c.len(), rust_abi().len());
}

// ---------------------------------------------------------------------------------------------
// The IPC payload
// ---------------------------------------------------------------------------------------------

fn words(a: i32, b: i32, c: i32) -> Vec<u8> {
    [a, b, c].iter().flat_map(|w| w.to_ne_bytes()).collect()
}

#[test]
fn payload_round_trip() {
    assert_eq!(ACTION_VFIO, "memplane_vfio_container");
    let req = encode_request(VfioRequest::ContainerFd);
    assert_eq!(req.len(), VFIO_MP_PARAM_LEN);
    assert_eq!(req.to_vec(), words(0x100, 0, 0));
    assert_eq!(decode_request(&req), Ok(VfioRequest::ContainerFd));

    for (result, code) in [
        (VfioResult::Ok, 0),
        (VfioResult::NoFd, 1),
        (VfioResult::Err, 0xFF),
    ] {
        let r = VfioReply {
            req: VfioRequest::ContainerFd,
            result,
        };
        let b = encode_reply(r);
        assert_eq!(b.to_vec(), words(0x100, code, 0));
        assert_eq!(decode_reply(&b), Ok(r));
        assert_eq!(VfioResult::from_code(code), Ok(result));
        assert_eq!(result.code(), code);
    }
    // The unused fields are ignored (DPDK leaves them uninitialised in requests).
    assert_eq!(
        decode_request(&words(0x100, 0x5a5a, -1)),
        Ok(VfioRequest::ContainerFd)
    );
    assert_eq!(
        decode_reply(&words(0x100, 1, 42)),
        Ok(VfioReply {
            req: VfioRequest::ContainerFd,
            result: VfioResult::NoFd
        })
    );
}

#[test]
fn payload_strict_errors() {
    for len in [0, 4, 8, 11, 13, 16, 256] {
        let b = vec![0u8; len];
        assert_eq!(decode_request(&b), Err(VfioMpError::WrongLength { len }));
        assert_eq!(decode_reply(&b), Err(VfioMpError::WrongLength { len }));
    }
    // DPDK 22.11's and main's other codes are not ours.
    for code in [0, 0x200, 0x400, 0x800, -1] {
        assert_eq!(
            decode_request(&words(code, 0, 0)),
            Err(VfioMpError::UnknownRequest { code })
        );
        assert_eq!(
            decode_reply(&words(code, 0, 0)),
            Err(VfioMpError::UnknownRequest { code })
        );
    }
    for code in [2, 3, 0xFE, 0x100, -1] {
        assert_eq!(
            decode_reply(&words(0x100, code, 0)),
            Err(VfioMpError::UnknownResult { code })
        );
    }
    let e = decode_reply(&[0; 3]).unwrap_err().to_string();
    assert!(e.contains("3 bytes") && e.contains(ACTION_VFIO), "{e}");
}

#[test]
fn payload_fd_counts() {
    let ok = VfioReply {
        req: VfioRequest::ContainerFd,
        result: VfioResult::Ok,
    };
    assert_eq!(check_reply_fds(&ok, 1), Ok(()));
    for fds in [0, 2] {
        assert_eq!(
            check_reply_fds(&ok, fds),
            Err(VfioMpError::FdCount {
                result: VfioResult::Ok,
                fds
            })
        );
    }
    for result in [VfioResult::NoFd, VfioResult::Err] {
        let r = VfioReply {
            req: VfioRequest::ContainerFd,
            result,
        };
        assert_eq!(check_reply_fds(&r, 0), Ok(()));
        assert_eq!(
            check_reply_fds(&r, 1),
            Err(VfioMpError::FdCount { result, fds: 1 })
        );
    }
}

#[test]
fn error_messages() {
    let cases = [
        (DmaError::NoVfio, "VFIO is not available here"),
        (
            DmaError::Open {
                errno: libc::EACCES,
            },
            "cannot open",
        ),
        (DmaError::ApiVersion { found: 7 }, "version 7"),
        (
            DmaError::Ioctl {
                op: "VFIO_IOMMU_MAP_DMA",
                errno: libc::ENOTTY,
            },
            "VFIO_IOMMU_MAP_DMA: ",
        ),
        (
            DmaError::SizeMismatch {
                asked: 0x20_0000,
                unmapped: 0x40_0000,
            },
            "cleared 0x400000 bytes instead of 0x200000",
        ),
        (
            DmaError::Overlap {
                iova: 0x1000,
                len: 0x1000,
            },
            "overlaps",
        ),
        (
            DmaError::InvalidRange {
                vaddr: Some(0x1),
                iova: 0,
                len: 0,
            },
            "vaddr 0x1",
        ),
        (DmaError::Injected, "injected"),
    ];
    for (e, want) in cases {
        let s = e.to_string();
        assert!(s.contains(want), "{e:?}: {s}");
        let _: &dyn std::error::Error = &e;
    }
}
