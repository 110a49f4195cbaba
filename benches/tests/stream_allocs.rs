//! Per-event work on a stream allocates nothing once its buffers have grown
//! and the tokenizer is warm:
//! the usage scanner, the usage-chunk filter and the trace tally, over a long
//! chat stream, counted by an instrumented allocator. (One test in this
//! binary: the allocator counts every thread.)

use std::alloc::System;

use bytes::Bytes;
use sluice_tokens::{Encoding, UsageChunkFilter, UsageScanner};
use sluice_trace::record::Tally;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

#[path = "support/events.rs"]
mod events;

#[test]
fn stream_events_allocate_nothing_in_steady_state() {
    sluice_tokens::preload(Encoding::O200kBase);
    let events: Vec<Bytes> = events::chat_stream(1000);
    let shared = events.clone();
    let mut scanner = UsageScanner::new(true, Encoding::O200kBase, 10);
    let mut filter = UsageChunkFilter::new();
    let mut tally = Tally::new(4096);
    // The first events grow the buffers and warm the tokenizer (its lazy DFA
    // builds states the first time it sees a text's shape).
    let (warm, rest) = events.split_at(600);
    for e in warm {
        scanner.feed(e);
        tally.feed(e);
        filter.feed(e.clone());
    }
    let region = Region::new(GLOBAL);
    let mut passed = 0usize;
    for e in rest {
        scanner.feed(e);
        tally.feed(e);
        passed += filter.feed(e.clone()).len();
    }
    let stats = region.change();
    // Reading, filtering and tallying an event allocate nothing, and neither
    // does counting a 2 KiB batch of generated text once the tokenizer is warm
    // (the window holds at least one such batch).
    assert_eq!(
        (stats.allocations, stats.reallocations),
        (0, 0),
        "over {} events after warm-up: {stats:?}",
        rest.len()
    );
    // The work was done: the usage chunk was read and removed.
    let (usage, _) = scanner.finish().expect("usage");
    assert_eq!(usage.completion_tokens, 1000);
    assert!(passed > 0 && passed < rest.iter().map(Bytes::len).sum::<usize>());
    drop(shared);
}
