//! `memplane::Config`: a process started with and without shared memory, in-process.

mod common;

use common::test_dir;
use memplane::unix::ProcType;

#[test]
fn a_primary_without_memory_has_no_heap_and_one_with_memory_has_both() {
    let dir = test_dir();
    let p = memplane::Config::new()
        .runtime_dir(dir.path())
        .proc_type(ProcType::Primary)
        .without_memory()
        .init()
        .expect("primary without memory");
    assert!(p.try_mem().is_none() && p.try_heap().is_none());
    drop(p);

    let dir = test_dir();
    let p = memplane::Config::new()
        .runtime_dir(dir.path())
        .proc_type(ProcType::Primary)
        .no_huge()
        .memory_mb(64)
        .init()
        .expect("primary with no-huge memory");
    let h = p.try_heap().expect("a heap");
    let b = h.malloc(4096, 64).expect("a block");
    assert_eq!(b.as_ptr() as usize % 64, 0);
    h.free(b).expect("free");
    assert!(p.try_mem().is_some());
}
