use super::ack::encode_ack;
use super::*;
use std::io::Write;
use std::time::{Duration, Instant};

const BIG: u64 = 1 << 30;

fn opts(segment_bytes: u64, max_bytes: u64) -> SpoolOptions {
    SpoolOptions {
        segment_bytes,
        max_bytes,
        fsync: false,
    }
}

/// Payloads of varying length that say which record they are.
fn rec(i: usize) -> Vec<u8> {
    format!("{{\"seq\":{i},\"pad\":\"{}\"}}", "x".repeat(i % 13)).into_bytes()
}

fn seq(payload: &[u8]) -> usize {
    let s = std::str::from_utf8(payload).unwrap();
    let start = s.find(':').unwrap() + 1;
    let end = s.find(',').unwrap();
    s[start..end].parse().unwrap()
}

fn framed(range: std::ops::Range<usize>) -> u64 {
    range.map(|i| framed_len(rec(i).len())).sum()
}

fn append_range(w: &mut SpoolWriter, range: std::ops::Range<usize>) {
    let recs: Vec<Vec<u8>> = range.map(rec).collect();
    let refs: Vec<&[u8]> = recs.iter().map(Vec::as_slice).collect();
    w.append(&refs).unwrap();
}

fn seg_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

/// Reads everything published, committing each batch when `commit` is set; returns the seqs.
fn drain(r: &mut SpoolReader, max_records: usize, commit: bool) -> Vec<usize> {
    let mut out = Vec::new();
    while let Some(batch) = r.read_batch(max_records, 1 << 20).unwrap() {
        assert!(!batch.records.is_empty() && batch.records.len() <= max_records);
        out.extend(batch.records.iter().map(|p| seq(p)));
        if commit {
            r.commit(batch.end).unwrap();
        }
    }
    out
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::SeqCst)
}

#[test]
fn round_trip_across_rotations_deletes_acknowledged_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("spool");
    let (mut w, mut r) = open(&dir, opts(256, BIG)).unwrap();
    let mode = fs::metadata(&dir).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o700
    );

    let mut n = 0;
    for size in (1..=7).cycle().take(50) {
        append_range(&mut w, n..n + size);
        n += size;
    }
    let files = seg_files(&dir);
    assert!(
        files.len() > 5,
        "expected rotations, got {} segments",
        files.len()
    );
    assert_eq!(load(&w.stats().segments), files.len() as u64);
    // Rotation happens only once a segment reached segment_bytes, so each closed one ends
    // past it by less than one batch.
    for f in &files[..files.len() - 1] {
        let len = fs::metadata(f).unwrap().len();
        assert!(
            (256..256 + 7 * 64).contains(&len),
            "segment {f:?} has {len} bytes"
        );
    }

    let first = files[0].clone();
    let mut got = Vec::new();
    while let Some(batch) = r.read_batch(5, 1 << 20).unwrap() {
        got.extend(batch.records.iter().map(|p| seq(p)));
        r.commit(batch.end).unwrap();
        if batch.end.segment > 1 {
            assert!(
                !first.exists(),
                "first segment kept after the ack moved past it"
            );
        }
    }
    assert_eq!(got, (0..n).collect::<Vec<_>>());
    assert_eq!(
        seg_files(&dir).len(),
        1,
        "only the writer's segment remains"
    );
    let stats = r.stats();
    assert_eq!(load(&stats.segments), 1);
    assert_eq!(load(&stats.unshipped_bytes), 0);
    assert_eq!(load(&stats.unshipped_records), 0);
    assert_eq!(load(&stats.oldest_unshipped_us), 0);

    // The writer keeps going in its segment after everything was acknowledged.
    append_range(&mut w, n..n + 3);
    assert_eq!(drain(&mut r, 10, true), vec![n, n + 1, n + 2]);
}

#[test]
fn batch_respects_max_bytes_except_for_one_oversized_record() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut w, mut r) = open(tmp.path(), opts(4096, BIG)).unwrap();
    let small = vec![b'a'; 100];
    let huge = vec![b'b'; 1000];
    w.append(&[&small, &small, &small, &huge, &small]).unwrap();
    let sizes = |b: &Batch| b.records.iter().map(Vec::len).collect::<Vec<_>>();
    assert_eq!(
        sizes(&r.read_batch(100, 250).unwrap().unwrap()),
        vec![100, 100]
    );
    assert_eq!(sizes(&r.read_batch(100, 250).unwrap().unwrap()), vec![100]);
    assert_eq!(sizes(&r.read_batch(100, 250).unwrap().unwrap()), vec![1000]);
    assert_eq!(sizes(&r.read_batch(100, 250).unwrap().unwrap()), vec![100]);
    assert!(r.read_batch(100, 250).unwrap().is_none());
    assert!(r.read_batch(0, 250).unwrap().is_none());
}

#[test]
fn reopen_replays_from_the_ack_position_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    {
        let (mut w, mut r) = open(dir, opts(128, BIG)).unwrap();
        for i in 0..10 {
            append_range(&mut w, i * 3..i * 3 + 3);
        }
        for _ in 0..3 {
            let batch = r.read_batch(4, 1 << 20).unwrap().unwrap();
            r.commit(batch.end).unwrap();
        }
        // Read but never committed: must come back.
        assert_eq!(r.read_batch(4, 1 << 20).unwrap().unwrap().records.len(), 4);
    }
    for _ in 0..2 {
        let (_w, mut r) = open(dir, opts(128, BIG)).unwrap();
        let stats = r.stats();
        assert_eq!(load(&stats.recovered_records), 18);
        assert_eq!(load(&stats.unshipped_records), 18);
        assert_eq!(load(&stats.unshipped_bytes), framed(12..30));
        assert_eq!(drain(&mut r, 5, false), (12..30).collect::<Vec<_>>());
    }

    // Without a (valid) ack file, replay starts at the oldest segment: duplicates, no loss.
    for damage in [None, Some(b"garbage".to_vec())] {
        match damage {
            None => fs::remove_file(dir.join(ACK_FILE)).unwrap(),
            Some(bytes) => fs::write(dir.join(ACK_FILE), bytes).unwrap(),
        }
        let oldest = fs::read(&seg_files(dir)[0]).unwrap();
        let first_in_oldest =
            seq(&oldest[8..8 + u32::from_le_bytes(oldest[..4].try_into().unwrap()) as usize]);
        assert!(first_in_oldest <= 12);
        let (_w, mut r) = open(dir, opts(128, BIG)).unwrap();
        assert_eq!(
            drain(&mut r, 5, false),
            (first_in_oldest..30).collect::<Vec<_>>()
        );
    }
}

#[test]
fn ack_off_a_record_boundary_replays_from_the_oldest_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    {
        let (mut w, mut r) = open(dir, opts(4096, BIG)).unwrap();
        append_range(&mut w, 0..5);
        let batch = r.read_batch(2, 1 << 20).unwrap().unwrap();
        r.commit(batch.end).unwrap();
        let bad = Position {
            segment: batch.end.segment,
            offset: batch.end.offset + 1,
        };
        fs::write(dir.join(ACK_FILE), encode_ack(bad)).unwrap();
    }
    let (_w, mut r) = open(dir, opts(4096, BIG)).unwrap();
    assert_eq!(drain(&mut r, 10, false), (0..5).collect::<Vec<_>>());
}

#[test]
fn torn_tail_is_truncated_and_intact_records_survive() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    {
        let (mut w, _r) = open(dir, opts(1 << 20, BIG)).unwrap();
        for i in 0..10 {
            append_range(&mut w, i..i + 1);
        }
    }
    let seg = seg_files(dir).pop().unwrap();
    let full_len = fs::metadata(&seg).unwrap().len();
    assert_eq!(full_len, framed(0..10));

    // A crash in the middle of the last record's write.
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(full_len - 3)
        .unwrap();
    {
        let (mut w, mut r) = open(dir, opts(1 << 20, BIG)).unwrap();
        assert_eq!(fs::metadata(&seg).unwrap().len(), framed(0..9));
        assert_eq!(load(&r.stats().recovered_records), 9);
        assert_eq!(drain(&mut r, 100, false), (0..9).collect::<Vec<_>>());
        // New appends continue right after the last intact record.
        append_range(&mut w, 9..10);
        assert_eq!(drain(&mut r, 100, false), vec![9]);
    }
    assert_eq!(fs::metadata(&seg).unwrap().len(), full_len);

    // Garbage after the last record: a header with a wrong CRC, then zeros, then junk.
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&5u32.to_le_bytes()).unwrap();
    f.write_all(&0xdead_beefu32.to_le_bytes()).unwrap();
    f.write_all(b"hello").unwrap();
    f.write_all(&[0u8; 16]).unwrap();
    f.write_all(&[0xff; 13]).unwrap();
    drop(f);
    let (_w, mut r) = open(dir, opts(1 << 20, BIG)).unwrap();
    assert_eq!(fs::metadata(&seg).unwrap().len(), full_len);
    assert_eq!(drain(&mut r, 100, false), (0..10).collect::<Vec<_>>());
    assert_eq!(load(&r.stats().corrupt_records), 0);
}

#[test]
fn full_spool_refuses_whole_batches_until_a_commit_frees_space() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let payload = [b'p'; 42]; // 50 bytes framed
    let (mut w, mut r) = open(dir, opts(4096, 200)).unwrap();
    w.append(&[&payload, &payload]).unwrap();
    w.append(&[&payload]).unwrap();

    let seg = seg_files(dir).pop().unwrap();
    // One more record would fit, two do not: the batch is refused as a whole.
    match w.append(&[&payload, &payload]) {
        Err(SpoolError::Full { used, max }) => assert_eq!((used, max), (150, 200)),
        other => panic!("expected Full, got {other:?}"),
    }
    assert_eq!(fs::metadata(&seg).unwrap().len(), 150);
    assert_eq!(load(&w.stats().unshipped_records), 3);
    w.append(&[&payload]).unwrap();
    assert!(matches!(
        w.append(&[&payload]),
        Err(SpoolError::Full {
            used: 200,
            max: 200
        })
    ));
    assert_eq!(fs::metadata(&seg).unwrap().len(), 200);

    let batch = r.read_batch(2, 1 << 20).unwrap().unwrap();
    assert!(r.read_batch(10, 1 << 20).unwrap().is_some());
    // Reading alone frees nothing: only a commit does.
    assert!(matches!(
        w.append(&[&payload]),
        Err(SpoolError::Full { .. })
    ));
    r.commit(batch.end).unwrap();
    w.append(&[&payload, &payload]).unwrap();
    assert!(matches!(
        w.append(&[&payload]),
        Err(SpoolError::Full { .. })
    ));
    r.rewind();
    let records: usize = std::iter::from_fn(|| r.read_batch(10, 1 << 20).unwrap())
        .map(|b| b.records.len())
        .sum();
    assert_eq!(records, 4, "the refused records must not be in the spool");
}

#[test]
fn empty_and_oversized_records_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut w, mut r) = open(tmp.path(), opts(4096, BIG)).unwrap();
    let err = w.append(&[b"ok", b""]).unwrap_err();
    assert!(
        matches!(&err, SpoolError::Io { source, .. } if source.kind() == ErrorKind::InvalidInput),
        "{err}"
    );
    let huge = vec![0u8; MAX_RECORD_BYTES + 1];
    assert!(w.append(&[&huge]).is_err());
    assert!(r.read_batch(10, 1 << 20).unwrap().is_none());
    assert_eq!(fs::metadata(&seg_files(tmp.path())[0]).unwrap().len(), 0);
}

#[test]
fn second_open_of_a_live_spool_is_locked() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (w, r) = open(dir, opts(4096, BIG)).unwrap();
    assert!(matches!(open(dir, opts(4096, BIG)), Err(SpoolError::Locked { dir: d }) if d == dir));
    drop(w);
    // The reader alone still holds the lock.
    assert!(matches!(
        open(dir, opts(4096, BIG)),
        Err(SpoolError::Locked { .. })
    ));
    drop(r);
    assert!(open(dir, opts(4096, BIG)).is_ok());
}

#[test]
fn stats_are_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fsync = SpoolOptions {
        segment_bytes: 4096,
        max_bytes: BIG,
        fsync: true,
    };
    let (mut w, mut r) = open(dir, fsync).unwrap();
    let stats = w.stats();
    assert_eq!(load(&stats.segments), 1);
    assert_eq!(load(&stats.oldest_unshipped_us), 0);

    let t0 = now_us();
    append_range(&mut w, 0..3);
    let t1 = now_us();
    std::thread::sleep(Duration::from_millis(3));
    let t2 = now_us();
    append_range(&mut w, 3..5);
    assert_eq!(load(&stats.unshipped_bytes), framed(0..5));
    assert_eq!(load(&stats.unshipped_records), 5);
    let oldest_a = load(&stats.oldest_unshipped_us);
    assert!((t0..=t1).contains(&oldest_a), "{t0} <= {oldest_a} <= {t1}");

    // Part of the first append acknowledged: its time is still the oldest.
    let batch = r.read_batch(2, 1 << 20).unwrap().unwrap();
    r.commit(batch.end).unwrap();
    assert_eq!(load(&stats.unshipped_records), 3);
    assert_eq!(load(&stats.unshipped_bytes), framed(2..5));
    assert_eq!(load(&stats.oldest_unshipped_us), oldest_a);

    // The first append done: the second one's time.
    let batch = r.read_batch(1, 1 << 20).unwrap().unwrap();
    r.commit(batch.end).unwrap();
    assert_eq!(load(&stats.unshipped_records), 2);
    assert_eq!(load(&stats.unshipped_bytes), framed(3..5));
    assert!(load(&stats.oldest_unshipped_us) >= t2);

    // A re-read after rewind is not counted twice.
    r.read_batch(1, 1 << 20).unwrap().unwrap();
    r.rewind();
    let batch = r.read_batch(10, 1 << 20).unwrap().unwrap();
    assert_eq!(batch.records.len(), 2);
    r.commit(batch.end).unwrap();
    assert_eq!(load(&stats.unshipped_records), 0);
    assert_eq!(load(&stats.unshipped_bytes), 0);
    assert_eq!(load(&stats.oldest_unshipped_us), 0);
    // A stale commit changes nothing.
    r.commit(Position {
        segment: 0,
        offset: 0,
    })
    .unwrap();
    assert_eq!(load(&stats.unshipped_records), 0);

    append_range(&mut w, 5..9);
    drop((w, r));
    let seg = seg_files(dir).pop().unwrap();
    let mtime = mtime_us(&fs::metadata(&seg).unwrap());
    let (_w, r) = open(dir, fsync).unwrap();
    let stats = r.stats();
    assert_eq!(load(&stats.recovered_records), 4);
    assert_eq!(load(&stats.unshipped_records), 4);
    assert_eq!(load(&stats.unshipped_bytes), framed(5..9));
    assert_eq!(load(&stats.oldest_unshipped_us), mtime);
    assert_eq!(load(&stats.segments), 1);
}

#[test]
fn corrupt_record_in_an_older_segment_skips_the_rest_of_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    {
        let (mut w, _r) = open(dir, opts(128, BIG)).unwrap();
        for i in 0..30 {
            append_range(&mut w, i..i + 1);
        }
    }
    let files = seg_files(dir);
    assert!(files.len() >= 3);
    let first_len = fs::metadata(&files[0]).unwrap().len();
    let in_first = (0..30)
        .take_while(|&i| framed(0..i + 1) <= first_len)
        .count();
    assert!(in_first >= 3);
    // Flip a payload byte of the second record.
    let mut bytes = fs::read(&files[0]).unwrap();
    bytes[usize::try_from(framed(0..1)).unwrap() + 9] ^= 0x55;
    fs::write(&files[0], bytes).unwrap();

    let (_w, mut r) = open(dir, opts(128, BIG)).unwrap();
    let expected: Vec<usize> = std::iter::once(0).chain(in_first..30).collect();
    assert_eq!(drain(&mut r, 4, true), expected);
    let stats = r.stats();
    assert_eq!(load(&stats.corrupt_records), 1);
    assert_eq!(load(&stats.unshipped_bytes), 0);
    assert_eq!(load(&stats.unshipped_records), 0);
    assert_eq!(seg_files(dir).len(), 1);
}

#[test]
fn concurrent_writer_and_reader_see_every_record_once_in_order() {
    const N: usize = 10_000;
    let tmp = tempfile::tempdir().unwrap();
    let (mut w, mut r) = open(tmp.path(), opts(4096, BIG)).unwrap();
    let writer = std::thread::spawn(move || {
        let mut n = 0;
        let mut size = 0;
        while n < N {
            size = size % 17 + 1;
            let end = (n + size).min(N);
            append_range(&mut w, n..end);
            n = end;
        }
        w
    });

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = Vec::with_capacity(N);
    let mut batches = 0;
    while got.len() < N {
        assert!(
            Instant::now() < deadline,
            "only {} records after 60s",
            got.len()
        );
        match r.read_batch(100, 2048).unwrap() {
            None => std::thread::yield_now(),
            Some(batch) => {
                batches += 1;
                if batches % 7 == 0 {
                    // A failed shipment: these come again after the rewind.
                    r.rewind();
                    continue;
                }
                got.extend(batch.records.iter().map(|p| seq(p)));
                r.commit(batch.end).unwrap();
            }
        }
    }
    let w = writer.join().unwrap();
    assert_eq!(got, (0..N).collect::<Vec<_>>());
    assert!(r.read_batch(100, 2048).unwrap().is_none());
    let stats = w.stats();
    assert_eq!(load(&stats.unshipped_records), 0);
    assert_eq!(load(&stats.unshipped_bytes), 0);
    assert_eq!(load(&stats.segments), 1);
    assert_eq!(seg_files(tmp.path()).len(), 1);
}

#[tokio::test]
async fn append_signals_the_notifier() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut w, mut r) = open(tmp.path(), opts(4096, BIG)).unwrap();
    let notify = r.notifier();
    assert!(Arc::ptr_eq(&notify, &w.notifier()));
    let waiter = tokio::spawn(async move {
        notify.notified().await;
        r.read_batch(10, 1 << 20).unwrap().map(|b| b.records.len())
    });
    tokio::task::yield_now().await;
    append_range(&mut w, 0..2);
    let got = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, Some(2));
}
