//! The pipeline's pure stages alone, on one LiveKit-shaped call of 50 turns (~470 spans, 10 KB of
//! payload text each): call-id resolution and classification, aggregate update, the call table,
//! span → JSON, byte-capped batching, gzip, and the core summary build.
//!
//! `cargo bench --bench stages` (about 60 s on 2 cores). Prints the gzip ratio of each level.
#![allow(missing_docs, clippy::unwrap_used, clippy::print_stderr)]

#[path = "../examples/support/voice.rs"]
mod voice;

use std::hint::black_box;
use std::time::{Duration, UNIX_EPOCH};

use callscope::__bench::{self as hooks, Aggregate, Batcher, CallTable, Encoder};
use callscope::Config;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use opentelemetry::trace::TracerProvider;
use opentelemetry_sdk::trace::{
    InMemorySpanExporter, SdkTracerProvider, SimpleSpanProcessor, SpanData,
};

const TURNS: u32 = 50;
const SPAN_BYTES: usize = 10_000;
/// The default `CALLSCOPE_MAX_REQUEST_BYTES` (4 MB) less room for the body's frame.
const BUDGET: usize = 3_990_000;

fn config() -> Config {
    Config::builder()
        .without_env()
        .endpoint("http://127.0.0.1:9/v1/calls")
        .build()
        .unwrap()
}

/// The ended spans of one simulated call, in end order.
fn call_spans() -> Vec<SpanData> {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(SimpleSpanProcessor::new(exporter.clone()))
        .build();
    let tracer = provider.tracer("stages");
    let shape = voice::CallShape {
        turns: TURNS,
        span_bytes: SPAN_BYTES,
        tool_every: 1,
        ..voice::CallShape::default()
    };
    let t0 = UNIX_EPOCH + Duration::from_secs(1_790_000_000);
    voice::livekit_call(&tracer, "call-stages", &shape, t0, 7);
    let spans = exporter.get_finished_spans().unwrap();
    let _ = provider.shutdown();
    spans
}

fn stages(c: &mut Criterion) {
    let spans = call_spans();
    let n = spans.len() as u64;
    let keys: Vec<String> = config().call_id_keys.clone();
    let prepared = hooks::Keys::new(&keys);

    let mut g = c.benchmark_group("stages_per_call");
    g.throughput(Throughput::Elements(n));
    g.bench_function("classify_and_call_id", |b| {
        b.iter(|| {
            for s in &spans {
                black_box(hooks::classify(s, &prepared));
            }
        })
    });
    g.bench_function("call_id_root_attributes", |b| {
        let root = spans.last().unwrap();
        b.iter(|| {
            for _ in 0..n {
                black_box(hooks::find_call_id(&root.attributes, &prepared));
            }
        })
    });
    g.bench_function("aggregate_update", |b| {
        b.iter_batched(
            || Aggregate::new(keys.clone()),
            |mut a| {
                for s in &spans {
                    a.record(s);
                }
                a
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("call_table_record", |b| {
        b.iter_batched(
            || CallTable::new(config()),
            |t| {
                for s in &spans {
                    black_box(t.record(s));
                }
                t
            },
            BatchSize::SmallInput,
        )
    });

    let mut packed = Vec::new();
    for s in &spans {
        hooks::pack(&mut packed, s);
    }
    g.bench_function("span_to_packed", |b| {
        let mut out = Vec::with_capacity(packed.len());
        b.iter(|| {
            out.clear();
            for s in &spans {
                hooks::pack(&mut out, s);
            }
            black_box(out.len())
        })
    });
    g.bench_function("packed_to_view", |b| {
        b.iter(|| black_box(hooks::unpack(&packed)))
    });

    // The worker's serialiser reads the packed spans (no `SpanData` is rebuilt).
    let mut json = Vec::with_capacity(spans.len() * (SPAN_BYTES + 1024));
    let mut one = Vec::new();
    let mut one_packed = Vec::new();
    let mut serialized = Vec::new();
    for s in &spans {
        one.clear();
        one_packed.clear();
        hooks::pack(&mut one_packed, s);
        hooks::write_spans(&mut one, &one_packed, BUDGET);
        serialized.push(one.clone());
        json.extend_from_slice(&one);
    }
    g.throughput(Throughput::Bytes(json.len() as u64));
    g.bench_function("span_to_json", |b| {
        let mut out = Vec::with_capacity(json.len());
        b.iter(|| {
            out.clear();
            hooks::write_spans(&mut out, &packed, BUDGET);
            black_box(out.len())
        })
    });
    g.bench_function("batching_4mb", |b| {
        b.iter(|| {
            let mut batcher = Batcher::default();
            let mut sent = 0;
            for s in &serialized {
                sent += batcher.push(s, BUDGET).unwrap_or(0);
            }
            black_box(sent + batcher.take())
        })
    });
    let enc = Encoder::new(&config()).unwrap();
    let gz = enc.encode(&json);
    eprintln!(
        "gzip: {} spans, {} bytes of span JSON -> {} bytes ({:.1}x, {:.3} of raw)",
        n,
        json.len(),
        gz.len(),
        json.len() as f64 / gz.len() as f64,
        gz.len() as f64 / json.len() as f64
    );
    // The transport's level is `hooks::GZIP_LEVEL`; each level's ratio is printed here and its
    // speed is a criterion line of its own (same run), for the trade in BENCHMARKS.md. The
    // transport's compressor beside flate2's when they differ (`--features libdeflate`).
    type Gzip = fn(&[u8], u32) -> Vec<u8>;
    let compressors: &[(&str, Gzip)] = if cfg!(feature = "libdeflate") {
        &[("gzip", hooks::gzip), ("flate2_gzip", hooks::gzip_flate2)]
    } else {
        &[("gzip", hooks::gzip)]
    };
    for level in [1u32, 2, 3, 4, 5, 6] {
        for &(name, compress) in compressors {
            let out = compress(&json, level);
            eprintln!(
                "{name} level {level}{}: {:.3} of raw",
                if level == hooks::GZIP_LEVEL && name == "gzip" {
                    " (transport)"
                } else {
                    ""
                },
                out.len() as f64 / json.len() as f64,
            );
            g.bench_function(format!("{name}_level_{level}"), |b| {
                b.iter(|| black_box(compress(&json, level).len()))
            });
        }
    }
    g.finish();

    let mut g = c.benchmark_group("summary_build");
    let mut agg = Aggregate::new(keys.clone());
    for s in &spans {
        agg.record(s);
    }
    assert_eq!(agg.total_spans(), n);
    eprintln!(
        "core summary: {} bytes for {} spans / {} turns",
        agg.core_json(500_000).map_or(0, |j| j.len()),
        n,
        TURNS
    );
    g.bench_function("core_json", |b| {
        b.iter(|| black_box(agg.core_json(500_000)))
    });
    g.bench_function("transcript_with_metrics", |b| {
        b.iter(|| black_box(agg.transcript_with_metrics(BUDGET)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    targets = stages
}
criterion_main!(benches);
