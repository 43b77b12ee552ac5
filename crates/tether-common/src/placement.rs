//! Placement of agents on server replicas by rendezvous (highest random weight) hashing: every
//! party that knows the same member list computes the same ranking for an agent, with no
//! coordination. Pure functions; the hash is fixed here so that all versions agree.

/// The weight of `member` for `agent`: a 64-bit hash of both, stable across processes,
/// platforms and releases (FNV-1a over the bytes, then a 64-bit finalizer for avalanche).
pub fn weight(agent: &str, member: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    feed(agent.as_bytes());
    // A separator no id contains, so ("ab", "c") and ("a", "bc") differ.
    feed(&[0xff]);
    feed(member.as_bytes());
    fmix64(h)
}

/// MurmurHash3's 64-bit finalizer: every input bit flips each output bit with probability 1/2.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// `members` ranked for `agent`: highest weight first, ties (equal weights, which needs equal
/// members) broken by the member's text so the order is total.
pub fn rank<'a, M: AsRef<str>>(agent: &str, members: &'a [M]) -> Vec<&'a M> {
    let mut ranked: Vec<(u64, &M)> = members
        .iter()
        .map(|m| (weight(agent, m.as_ref()), m))
        .collect();
    ranked.sort_by(|(wa, a), (wb, b)| wb.cmp(wa).then_with(|| a.as_ref().cmp(b.as_ref())));
    ranked.into_iter().map(|(_, m)| m).collect()
}

/// The `k` members `agent` is placed on (all of them when `k` is at least their number).
pub fn top_k<'a, M: AsRef<str>>(agent: &str, members: &'a [M], k: usize) -> Vec<&'a M> {
    let mut ranked = rank(agent, members);
    ranked.truncate(k);
    ranked
}

/// The members to hold sessions to, from a ranking: the first `k` members that are not
/// `down`, plus every `down` member ranked above the last of them (kept so that it is
/// noticed when it comes back, at which point the substitute below it is released).
pub fn wanted<'a, M>(ranked: &[&'a M], k: usize, down: impl Fn(&M) -> bool) -> Vec<&'a M> {
    let mut out = Vec::new();
    let mut up = 0;
    for member in ranked {
        if up >= k {
            break;
        }
        out.push(*member);
        if !down(member) {
            up += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:8443")).collect()
    }

    fn agents(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("edge-{i}")).collect()
    }

    fn placement(agents: &[String], members: &[String], k: usize) -> HashMap<String, Vec<String>> {
        agents
            .iter()
            .map(|a| {
                let top = top_k(a, members, k).into_iter().cloned().collect();
                (a.clone(), top)
            })
            .collect()
    }

    #[test]
    fn the_weight_is_fixed_across_releases() {
        // Every agent and replica of a fleet must agree, whatever version each runs: a change
        // (the value was computed independently of this code, from the FNV-1a and fmix64
        // definitions)
        // of these values is a change of the placement of every agent.
        assert_eq!(weight("edge-7", "r1"), weight("edge-7", "r1"));
        assert_eq!(weight("edge-7", "r1"), 0x30dd_e3fb_67ed_44de);
        assert_ne!(weight("ab", "c"), weight("a", "bc"));
    }

    #[test]
    fn ranking_is_deterministic_and_independent_of_member_order() {
        let m = members(7);
        let mut reversed = m.clone();
        reversed.reverse();
        for agent in agents(50) {
            assert_eq!(rank(&agent, &m), rank(&agent, &reversed));
            assert_eq!(top_k(&agent, &m, 3), top_k(&agent, &reversed, 3));
        }
        assert_eq!(top_k("a", &m, 99).len(), 7);
        assert!(top_k("a", &m, 0).is_empty());
        assert!(top_k::<String>("a", &[], 2).is_empty());
    }

    #[test]
    fn twenty_replicas_share_twenty_thousand_agents_within_ten_percent() {
        let m = members(20);
        let a = agents(20_000);
        for k in [1, 2, 3] {
            let mut load: BTreeMap<&str, usize> = m.iter().map(|r| (r.as_str(), 0)).collect();
            for top in placement(&a, &m, k).values() {
                for r in top {
                    *load.get_mut(r.as_str()).expect("a member") += 1;
                }
            }
            let mean = (a.len() * k) as f64 / m.len() as f64;
            for (replica, n) in &load {
                let off = (*n as f64 - mean).abs() / mean;
                assert!(off <= 0.10, "k={k}: {replica} holds {n}, mean {mean}");
            }
        }
    }

    #[test]
    fn a_joining_replica_moves_about_k_over_n_plus_one() {
        let m = members(20);
        let mut grown = m.clone();
        grown.push("10.0.0.200:8443".to_owned());
        let a = agents(20_000);
        let k = 2;
        let before = placement(&a, &m, k);
        let after = placement(&a, &grown, k);
        let mut moved = 0;
        for agent in &a {
            let old = &before[agent];
            for r in &after[agent] {
                if !old.contains(r) {
                    // The only placement that may appear is the new replica.
                    assert_eq!(r, "10.0.0.200:8443");
                    moved += 1;
                }
            }
        }
        let expected = (a.len() * k) as f64 / 21.0;
        let ratio = moved as f64 / expected;
        assert!(
            (0.9..=1.1).contains(&ratio),
            "moved {moved}, expected ~{expected}"
        );
    }

    #[test]
    fn a_leaving_replica_moves_only_its_own_agents() {
        let m = members(20);
        let gone = m[5].clone();
        let shrunk: Vec<String> = m.iter().filter(|r| **r != gone).cloned().collect();
        let a = agents(5_000);
        let k = 2;
        let before = placement(&a, &m, k);
        let after = placement(&a, &shrunk, k);
        for agent in &a {
            let (old, new) = (&before[agent], &after[agent]);
            if old.contains(&gone) {
                // It keeps its other placement and takes its next replica in rank order.
                let kept: Vec<&String> = old.iter().filter(|r| **r != gone).collect();
                assert!(kept.iter().all(|r| new.contains(r)), "{agent}");
                let next = rank(agent, &m)[k].clone();
                assert!(new.contains(&next), "{agent} moves to its next replica");
            } else {
                assert_eq!(old, new, "{agent} was not on the leaving replica");
            }
        }
    }

    #[test]
    fn wanted_substitutes_the_next_ranked_member_for_each_down_one() {
        let ranked = ["a", "b", "c", "d", "e"];
        let refs: Vec<&&str> = ranked.iter().collect();
        let pick = |down: &[&str]| -> Vec<&str> {
            wanted(&refs, 2, |m: &&str| down.contains(m))
                .into_iter()
                .copied()
                .collect()
        };
        assert_eq!(pick(&[]), ["a", "b"]);
        assert_eq!(pick(&["a"]), ["a", "b", "c"]);
        assert_eq!(pick(&["b", "c"]), ["a", "b", "c", "d"]);
        assert_eq!(pick(&["a", "b", "c", "d", "e"]), ["a", "b", "c", "d", "e"]);
        assert_eq!(pick(&["e"]), ["a", "b"]);
        assert!(wanted(&refs, 0, |_| false).is_empty());
    }
}
