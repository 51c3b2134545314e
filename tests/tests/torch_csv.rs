//! torch CSV interop: export byte-identical to torch's artifact, refusal of DualPipe, round
//! trips through import and lowering, and messages that progress under torch's simulator rules.

use std::collections::HashSet;

use dualpipe_planner::lower::lower_torch_order;
use dualpipe_planner::{Family, PlanRequest, plan};
use dualpipe_schedule::{
    Costs, ExecutionModel, Instruction, Schedule, ValidSchedule, read_torch_csv, simulate,
    to_torch_csv,
};

fn fixture(name: &str) -> String {
    let path = dualpipe_tests::fixtures().join("torch").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn valid(request: PlanRequest) -> ValidSchedule {
    plan(&request).unwrap_or_else(|e| panic!("{request:?}: {e}"))
}

/// Imports a compute-only CSV as `dualpipe convert --from torch-csv` does.
fn import(csv: &str, name: &str) -> ValidSchedule {
    let order = read_torch_csv(csv).unwrap_or_else(|e| panic!("{name}: {e}"));
    let schedule = lower_torch_order(order, name).unwrap_or_else(|e| panic!("{name}: {e}"));
    ValidSchedule::new(schedule).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn computes(schedule: &Schedule) -> Vec<Vec<Instruction>> {
    schedule
        .ranks
        .iter()
        .map(|l| l.iter().copied().filter(Instruction::is_compute).collect())
        .collect()
}

/// Every family torch can express, at a few sizes, training and inference.
fn exportable() -> Vec<PlanRequest> {
    let mut requests = Vec::new();
    for forward_only in [false, true] {
        for (family, n, c) in [
            (Family::DualPipeV, 1, 2),
            (Family::DualPipeV, 3, 7),
            (Family::DualPipeV, 4, 10),
            (Family::Zbv, 2, 4),
            (Family::Zbv, 4, 8),
            (Family::OneFOneB, 4, 8),
            (Family::GPipe, 3, 5),
            (Family::Zb1p, 4, 8),
            (Family::Interleaved1F1B, 4, 8),
            (Family::Interleaved1F1B, 2, 4),
        ] {
            let mut request = PlanRequest::new(family, n, c);
            if family == Family::Interleaved1F1B {
                request = request.chunks_per_rank(3);
            }
            requests.push(if forward_only {
                request.forward_only()
            } else {
                request
            });
        }
    }
    requests
}

#[test]
fn dualpipev_4x10_is_byte_identical_to_torchs_artifact() {
    let ours = to_torch_csv(&valid(PlanRequest::new(Family::DualPipeV, 4, 10)), false).unwrap();
    assert_eq!(ours, fixture("artifacts/dualpipev_4rank_10mb.csv"));
}

#[test]
fn dualpipe_is_refused_with_the_reason() {
    for with_comms in [false, true] {
        let error =
            to_torch_csv(&valid(PlanRequest::new(Family::DualPipe, 4, 8)), with_comms).unwrap_err();
        assert!(
            error
                .0
                .contains("stage 0 runs on rank 0 (pipeline 0) and on rank 3 (pipeline 1)")
                && error.0.contains("two copies of a stage on two ranks"),
            "{error}"
        );
    }
}

#[test]
fn exports_read_back_to_the_same_compute_order() {
    for request in exportable() {
        let original = valid(request);
        let csv = to_torch_csv(&original, false).unwrap();
        let imported = import(&csv, request.family.name());
        let (a, b) = (original.schedule(), imported.schedule());
        assert_eq!(computes(a), computes(b), "{request:?}");
        assert_eq!(a.pipelines, b.pipelines, "{request:?}");
        assert_eq!(a.forward_only, b.forward_only, "{request:?}");
        assert_eq!(to_torch_csv(&imported, false).unwrap(), csv, "{request:?}");
    }
}

#[test]
fn torchs_own_orders_import_and_simulate() {
    let dir = dualpipe_tests::fixtures().join("torch");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".csv"))
        .collect();
    names.sort();
    assert!(names.len() >= 20, "{names:?}");
    for name in &names {
        let imported = import(&fixture(name), name);
        for model in [ExecutionModel::Blocking, ExecutionModel::Async] {
            simulate(&imported, &Costs::default(), model).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
    // torch's DualPipeV order is ours: the import has our planner's compute order.
    let imported = import(&fixture("artifacts/dualpipev_4rank_10mb.csv"), "dualpipev");
    let planned = valid(PlanRequest::new(Family::DualPipeV, 4, 10));
    assert_eq!(computes(imported.schedule()), computes(planned.schedule()));
}

/// A torch action, flattened: (stage, type, micro-batch).
type Action = (u32, String, u32);

/// Runs a compute_comms CSV under the readiness rules of torch's `_simulate_comms_compute`
/// (each step, every rank in order runs its next action if ready); `Err` names where it stops.
fn torch_progress(csv: &str) -> Result<(), String> {
    let mut rows: Vec<Vec<Action>> = Vec::new();
    for line in csv.lines() {
        let mut row = Vec::new();
        for cell in line.split(',').filter(|c| !c.is_empty()) {
            let inner = cell
                .strip_prefix('(')
                .and_then(|c| c.strip_suffix(")OVERLAP_F_B"))
                .unwrap_or(cell);
            for part in inner.split(';') {
                let digits = part.bytes().take_while(u8::is_ascii_digit).count();
                let tail = part[digits..].trim_end_matches(|c: char| c.is_ascii_digit());
                let mb = &part[digits + tail.len()..];
                row.push((
                    part[..digits].parse().unwrap(),
                    tail.to_string(),
                    mb.parse().unwrap(),
                ));
            }
        }
        rows.push(row);
    }
    let mut rank_of = std::collections::HashMap::new();
    let mut last = 0;
    for (rank, row) in rows.iter().enumerate() {
        for (stage, kind, _) in row {
            if ["F", "B", "I", "W"].contains(&kind.as_str()) {
                rank_of.insert(*stage, rank);
                last = last.max(*stage);
            }
        }
    }
    let mut done: Vec<HashSet<Action>> = vec![HashSet::new(); rows.len()];
    let mut next = vec![0usize; rows.len()];
    let has = |done: &Vec<HashSet<Action>>, stage: u32, kind: &str, mb: u32| {
        rank_of
            .get(&stage)
            .is_some_and(|&r| done[r].contains(&(stage, kind.to_string(), mb)))
    };
    loop {
        let mut progress = false;
        for rank in 0..rows.len() {
            let Some((s, kind, m)) = rows[rank].get(next[rank]).cloned() else {
                continue;
            };
            let ready = match kind.as_str() {
                "F" => s == 0 || has(&done, s, "RECV_F", m) || has(&done, s - 1, "F", m),
                "B" | "I" => {
                    s == last
                        || has(&done, s, "RECV_B", m)
                        || has(&done, s + 1, "I", m)
                        || has(&done, s + 1, "B", m)
                }
                "W" => true,
                "SEND_F" => has(&done, s, "F", m),
                "SEND_B" => has(&done, s, "I", m) || has(&done, s, "B", m),
                "RECV_F" => has(&done, s - 1, "SEND_F", m),
                "RECV_B" => has(&done, s + 1, "SEND_B", m),
                other => return Err(format!("unknown action {s}{other}{m}")),
            };
            if ready {
                done[rank].insert((s, kind, m));
                next[rank] += 1;
                progress = true;
            }
        }
        if next.iter().zip(&rows).all(|(&k, row)| k == row.len()) {
            return Ok(());
        }
        if !progress {
            let heads: Vec<String> = (0..rows.len())
                .filter_map(|r| {
                    rows[r]
                        .get(next[r])
                        .map(|(s, k, m)| format!("rank {r} at {s}{k}{m}"))
                })
                .collect();
            return Err(format!("not progressing: {}", heads.join(", ")));
        }
    }
}

#[test]
fn messages_progress_under_torchs_simulator_rules() {
    for request in exportable() {
        let schedule = valid(request);
        let csv = to_torch_csv(&schedule, true).unwrap();
        torch_progress(&csv).unwrap_or_else(|e| panic!("{request:?}: {e}"));
        let sends = schedule
            .schedule()
            .ranks
            .iter()
            .flatten()
            .filter(|i| matches!(i, Instruction::Send(_)))
            .count();
        assert_eq!(csv.matches("SEND_").count(), sends, "{request:?}");
        assert_eq!(csv.matches("RECV_").count(), sends, "{request:?}");
        // Without the messages, the compute-only form.
        let without: String = csv
            .lines()
            .map(|l| {
                let cells: Vec<&str> = l
                    .split(',')
                    .filter(|c| !c.contains("SEND_") && !c.contains("RECV_"))
                    .collect();
                format!("{}\n", cells.join(","))
            })
            .collect();
        assert_eq!(
            without,
            to_torch_csv(&schedule, false).unwrap(),
            "{request:?}"
        );
    }
    // The rules can fail: rank 0 waits for a gradient before it sends the activation.
    let stalled = "0RECV_B0,0F0,0SEND_F0,0B0\n1RECV_F0,1F0,1B0,1SEND_B0\n";
    assert!(
        torch_progress(stalled)
            .unwrap_err()
            .contains("rank 0 at 0RECV_B0")
    );
    assert!(torch_progress("0F0,0SEND_F0,0RECV_B0,0B0\n1RECV_F0,1F0,1B0,1SEND_B0\n").is_ok());
}
