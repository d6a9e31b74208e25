//! A program whose every allocation goes through memplane's global allocator: collections,
//! strings, threads, a HashMap, large and zeroed buffers. Before `install` the system allocator
//! serves; after it, the shared heap (checked by address), with frees routed back to whoever
//! allocated each pointer, including pointers allocated before `install`.

use std::collections::{BTreeMap, HashMap};

use memplane_heap::global::{self, MemplaneAlloc, is_heap_pointer};
use memplane_hugepage::MemOptions;
use memplane_testkit::TestDir;

mod common;

#[global_allocator]
static ALLOC: MemplaneAlloc = MemplaneAlloc;

#[test]
fn everything_runs_on_the_shared_heap() {
    let before: Vec<String> = (0..100).map(|i| format!("before install {i}")).collect();
    assert!(!is_heap_pointer(before[0].as_ptr()));

    let dir = TestDir::new("mpg");
    let p = common::primary(&dir, MemOptions::new().no_huge());
    let heap = &p.heap;
    global::install(heap);
    // Uninstalled however the test ends (a failed assertion too), before the heap goes.
    struct Uninstall;
    impl Drop for Uninstall {
        fn drop(&mut self) {
            global::uninstall();
        }
    }
    let _uninstall = Uninstall;

    // Collections and strings of every size class and beyond.
    let mut v: Vec<u64> = (0..100_000).collect();
    assert!(is_heap_pointer(v.as_ptr().cast()));
    v.retain(|x| x % 3 == 0);
    let s: String = (0..5000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    assert!(is_heap_pointer(s.as_ptr()));
    let mut m = HashMap::new();
    let mut b = BTreeMap::new();
    for i in 0..20_000u32 {
        m.insert(i, format!("value {i}"));
        b.insert(format!("key {i:08}"), vec![i as u8; (i % 300) as usize]);
    }
    assert_eq!(m[&777], "value 777");
    assert_eq!(b["key 00000042"].len(), 42);
    let small = Box::new(7u8);
    assert!(is_heap_pointer(&*small as *const u8));

    // Threads allocate and free, also each other's objects.
    let handles: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let mut keep = Vec::new();
                for i in 0..20_000usize {
                    let x = vec![t as u8; 1 + (i * 7) % 400];
                    if i % 10 == 0 {
                        keep.push(x);
                    }
                }
                keep
            })
        })
        .collect();
    let results: Vec<Vec<Vec<u8>>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (t, r) in results.iter().enumerate() {
        assert_eq!(r.len(), 2000);
        assert!(r.iter().all(|x| x.iter().all(|&b| b == t as u8)));
    }
    drop(results);

    // A thread's cached blocks go back to the heap when it ends: 100 small blocks freed into
    // its cache (fewer than a class holds, so none went back on the way) are the heap's again.
    let cached = 100;
    let in_thread = std::thread::scope(|sc| {
        sc.spawn(|| {
            let boxes: Vec<Box<[u8; 40]>> = (0..cached).map(|i| Box::new([i as u8; 40])).collect();
            assert!(boxes.iter().all(|b| is_heap_pointer(b.as_ptr())));
            drop(boxes);
            heap.stats(0).unwrap().alloc_count
        })
        .join()
        .unwrap()
    });
    let after = heap.stats(0).unwrap().alloc_count;
    assert!(
        after + cached <= in_thread,
        "the ended thread's cache went back: {in_thread} heap blocks in use before its end, \
         {after} after"
    );

    // Zeroed allocations (`vec![0; n]` asks `alloc_zeroed`): zero, from the heap, also where
    // the same memory was just written (pages kept in the heap meanwhile), at a size beyond
    // the thread caches (the heap's zmalloc) and at a cached
    // class (cleared on the way out of the cache).
    heap.set_shrink(false);
    for size in [8usize << 20, 40] {
        for _ in 0..3 {
            let mut z = vec![0u8; size];
            assert!(is_heap_pointer(z.as_ptr()), "{size}");
            assert!(z.iter().all(|&x| x == 0), "{size}");
            z.fill(0xa5);
        }
    }
    heap.set_shrink(true);

    // Pointers allocated before install are freed to the system allocator.
    drop(before);
    assert_eq!(heap.validate(), Ok(()));
    assert!(heap.stats(0).unwrap().alloc_count > 0);
    drop((v, s, m, b, small));
    assert_eq!(global::stats().errors, 0);
    assert_eq!(heap.validate(), Ok(()));
}
