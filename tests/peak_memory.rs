//! The measured peak resident memory of a piece of work. Alone in its test binary: the peak
//! is the process's, and another test's reset would move it.
#![cfg(target_os = "linux")]

use devft::federated::measure_peak_rss;

#[test]
fn the_peak_is_measured_per_piece_of_work() {
    const BIG: usize = 512 << 20;
    let (_, big) = measure_peak_rss(|| {
        let block = vec![1u8; BIG];
        std::hint::black_box(&block);
    });
    let big = big.expect("Linux reports the peak");
    assert!(big >= BIG as u64, "{big}");
    let (_, small) = measure_peak_rss(|| ());
    let small = small.expect("Linux reports the peak");
    assert!(
        small < big - BIG as u64 / 2,
        "the reset forgets the earlier peak: {small} vs {big}"
    );
}
