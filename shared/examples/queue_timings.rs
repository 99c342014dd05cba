//! Timings of the embedded queue at 200,000 messages: send, receive and ack of 500, depth, and
//! the adverse FIFO cases (a hot group ahead of everything, many delayed messages). A program
//! that prints figures, not a test:
//! `cargo run --release -p dualsync --example queue_timings`.
use std::sync::Arc;
use std::time::{Duration, Instant};

use dualsync::adapters::embedded::{EmbeddedDb, QueueConfig};
use dualsync::ports::{InMessage, OutMessage, Queue, SystemClock};

fn receipts(msgs: &[InMessage]) -> Vec<String> {
    msgs.iter().map(|m| m.receipt.clone()).collect()
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = EmbeddedDb::open(&dir.path().join("state.db"), Arc::new(SystemClock)).expect("open");
    for fifo in [false, true] {
        let name = if fifo { "bench.fifo" } else { "bench" };
        let q = db.queue(QueueConfig::new(name, fifo));
        let batch = |start: usize| -> Vec<OutMessage> {
            (start..start + 500)
                .map(|i| {
                    // ~10 messages per group, as a record key would give.
                    let body = format!("{{\"job\":\"j\",\"map\":\"m\",\"key\":\"k{i}\",\"seq\":{i}}}");
                    if fifo {
                        OutMessage::fifo(body, format!("g{}", i / 10), format!("d{i}"))
                    } else {
                        OutMessage::standard(body)
                    }
                })
                .collect()
        };
        let fill = Instant::now();
        for n in 0..400 {
            q.send(batch(n * 500)).await.expect("fill");
        }
        println!("[{name}] filled 200,000 in {:?}", fill.elapsed());

        let mut send = Vec::new();
        let mut recv = Vec::new();
        let mut ack = Vec::new();
        // Keep some batches in flight, as the workers do.
        let mut in_flight = std::collections::VecDeque::new();
        for n in 0..20 {
            let t = Instant::now();
            q.send(batch(200_000 + n * 500)).await.expect("send");
            send.push(t.elapsed());
            let t = Instant::now();
            let got = q.receive(500).await.expect("receive");
            recv.push(t.elapsed());
            assert_eq!(got.len(), 500);
            in_flight.push_back(receipts(&got));
            if in_flight.len() > 4 {
                let r = in_flight.pop_front().expect("batch");
                let t = Instant::now();
                q.ack(&r).await.expect("ack");
                ack.push(t.elapsed());
            }
        }
        let t = Instant::now();
        let d = q.depth().await.expect("depth");
        let depth_time = t.elapsed();
        let stats = |v: &mut Vec<Duration>| {
            v.sort();
            format!("median {:?}, max {:?}", v[v.len() / 2], v[v.len() - 1])
        };
        println!("[{name}] send 500: {}", stats(&mut send));
        println!("[{name}] receive 500: {}", stats(&mut recv));
        println!("[{name}] ack 500: {}", stats(&mut ack));
        println!("[{name}] depth {d:?} in {depth_time:?}");
    }

    // Adverse FIFO cases. One hot group of 100,000 ahead of everything, its head in flight:
    // a receive skips its rows one by one.
    let hot = db.queue(QueueConfig::new("hot.fifo", true));
    for n in 0..200 {
        let msgs = (0..500).map(|i| OutMessage::fifo(format!("h{n}.{i}"), "hot".into(), format!("h{n}.{i}"))).collect();
        hot.send(msgs).await.expect("fill hot");
    }
    hot.send((0..500).map(|i| OutMessage::fifo(format!("c{i}"), format!("c{i}"), format!("c{i}"))).collect())
        .await
        .expect("send cold");
    assert_eq!(hot.receive(1).await.expect("head").len(), 1);
    let t = Instant::now();
    let got = hot.receive(500).await.expect("receive past the hot group");
    println!("[hot.fifo] receive 500 behind 100,000 rows of a locked group: {:?}", t.elapsed());
    assert_eq!(got.len(), 500);

    // 50,000 messages of distinct groups released with a delay: the blocked-group set is big.
    let delayed = db.queue(QueueConfig::new("delayed.fifo", true));
    for n in 0..100 {
        let msgs =
            (0..500).map(|i| OutMessage::fifo(format!("d{n}.{i}"), format!("d{n}.{i}"), format!("d{n}.{i}"))).collect();
        delayed.send(msgs).await.expect("fill delayed");
        for m in delayed.receive(500).await.expect("receive") {
            delayed.release(&m.receipt, Duration::from_secs(3_600)).await.expect("release");
        }
    }
    delayed
        .send((0..500).map(|i| OutMessage::fifo(format!("f{i}"), format!("f{i}"), format!("f{i}"))).collect())
        .await
        .expect("send fresh");
    let t = Instant::now();
    let got = delayed.receive(500).await.expect("receive with many delayed");
    println!("[delayed.fifo] receive 500 with 50,000 delayed messages: {:?}", t.elapsed());
    assert_eq!(got.len(), 500);
    let t = Instant::now();
    let empty = delayed.is_empty().expect("is_empty");
    println!("[delayed.fifo] is_empty = {empty} in {:?}", t.elapsed());
}
