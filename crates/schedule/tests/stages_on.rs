//! `Topology::stages_on` gives every family's module convention; `Family::stages_formula`
//! states the number of stages each plans.

use dualpipe_planner::{Family, PlanRequest, plan};

fn stages(request: PlanRequest) -> Vec<Vec<u32>> {
    let valid = plan(&request).unwrap();
    let n = valid.schedule().num_ranks;
    (0..n).map(|r| valid.topology().stages_on(r)).collect()
}

#[test]
fn every_family_follows_its_convention() {
    for n in [1u32, 2, 4, 6] {
        let c = 2 * n;
        for family in Family::ALL {
            if family == Family::DualPipe && n % 2 == 1 {
                continue;
            }
            let mut request = PlanRequest::new(family, n, c);
            if family == Family::Interleaved1F1B {
                request = request.chunks_per_rank(3);
            }
            for forward_only in [false, true] {
                request.forward_only = forward_only;
                let expected: Vec<Vec<u32>> = (0..n)
                    .map(|r| match family {
                        Family::DualPipe => vec![r, n - 1 - r],
                        Family::DualPipeV | Family::Zbv => vec![r, 2 * n - 1 - r],
                        Family::Interleaved1F1B => vec![r, r + n, r + 2 * n],
                        Family::OneFOneB | Family::GPipe | Family::Zb1p => vec![r],
                    })
                    .collect();
                assert_eq!(stages(request), expected, "{family} on {n} ranks");
                let planned = plan(&request).unwrap().schedule().num_stages;
                let formula = match family.stages_formula() {
                    "N" => n,
                    "2N" => 2 * n,
                    "N x V" => 3 * n,
                    other => panic!("{family}: unknown formula {other}"),
                };
                assert_eq!(
                    planned,
                    formula,
                    "{family}: stages {}",
                    family.stages_formula()
                );
            }
        }
    }
}

#[test]
fn a_rank_out_of_range_runs_nothing() {
    let valid = plan(&PlanRequest::new(Family::OneFOneB, 2, 2)).unwrap();
    assert!(valid.topology().stages_on(2).is_empty());
}
