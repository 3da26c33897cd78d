//! Unit and property tests of the name table (run in debug and `--release`).

use super::*;
use proptest::prelude::*;
use std::collections::HashMap;
use std::string::{String, ToString};

const SEED: [u64; 2] = [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210];

fn n(s: &str) -> Name {
    Name::new(s.as_bytes()).unwrap()
}

/// Reserves and commits at once (as an ExMap create does).
fn put(t: &mut Names<u64>, name: Name, owner: Owner, value: u64) {
    let r = t.reserve(name, owner).unwrap();
    t.commit(r, value).unwrap();
}

fn table(owners: u32, quota: u32, system: u32) -> Names<u64> {
    Names::try_new(Limits { owners, quota, system }, SEED).unwrap()
}

#[test]
fn names_are_checked() {
    assert_eq!(Name::new(b""), Err(BadName));
    assert_eq!(Name::new(&[b'a'; NAME_MAX + 1]), Err(BadName));
    assert_eq!(Name::new(b"a b"), Err(BadName));
    assert_eq!(Name::new(b"a\0"), Err(BadName));
    assert_eq!(Name::new(&[0xc3, 0xa9]), Err(BadName));
    let long = n(&"x".repeat(NAME_MAX));
    assert_eq!(long.len(), NAME_MAX);
    assert_eq!(n("fz-a").as_str(), "fz-a");
    assert_eq!(std::format!("{:?} {}", n("q"), n("q")), "\"q\" q");
}

#[test]
fn slot_finds_the_value_until_the_name_goes() {
    let mut t = table(2, 4, 0);
    put(&mut t, n("a"), 0, 1);
    let r = t.reserve(n("pending"), 0).unwrap();
    assert_eq!(t.slot("pending"), None, "a reserved name has no value");
    assert_eq!(t.slot("nope"), None);
    let at = t.slot("a").unwrap();
    *t.get_mut_at(at, &n("a")).unwrap() += 10;
    assert_eq!(t.get("a").map(|e| *e.value), Some(11));
    assert_eq!(t.get_mut_at(at, &n("b")), None, "another name at that slot is not found");
    t.remove("a").unwrap();
    assert_eq!(t.get_mut_at(at, &n("a")), None, "removed");
    t.abort(r);
    // The freed slot is reused by the next name: the old id does not reach it by the old name.
    put(&mut t, n("b"), 1, 7);
    let b = t.slot("b").unwrap();
    assert_eq!(t.get_mut_at(at, &n("a")), None);
    assert_eq!(t.get_mut_at(b, &n("b")).copied(), Some(7));
}

/// A name hashed before the table's lock (`Keys::hash`) finds and reserves what the name
/// does; one hashed with other keys is hashed again by the table, never looked up wrong.
#[test]
fn hashed_names_are_found_as_names() {
    let mut t = table(2, 40, 0);
    assert_eq!(t.keys(), Keys::of(SEED));
    let (ours, other) = (t.keys(), Keys::of([SEED[1], SEED[0]]));
    for i in 0..20 {
        // Half entered hashed with the table's keys, half with other keys.
        let keys = if i % 2 == 0 { ours } else { other };
        let r = t.reserve_hashed(&keys.hash(n(&std::format!("h{i}"))), 0).unwrap();
        t.commit(r, i).unwrap();
    }
    for i in 0..20 {
        let name = n(&std::format!("h{i}"));
        assert_eq!(t.get(&name).map(|e| *e.value), Some(i), "h{i} as a name");
        let at = t.slot(&name).unwrap();
        for keys in [ours, other] {
            let h = keys.hash(name);
            assert_eq!(h.name(), &name);
            assert_eq!(t.slot_hashed(&h), Some(at), "h{i} hashed");
            assert_eq!(t.get_hashed(&h).map(|e| (*e.name, *e.value)), Some((name, i)), "h{i} hashed");
            assert_eq!(t.reserve_hashed(&h, 1).unwrap_err(), Error::Taken);
        }
    }
    for keys in [ours, other] {
        assert_eq!(t.slot_hashed(&keys.hash(n("absent"))), None);
        assert!(t.get_hashed(&keys.hash(n("absent"))).is_none());
        assert_eq!(t.remove_hashed(&keys.hash(n("absent"))), None);
    }
    assert_eq!(t.remove("h3").map(|(_, _, v)| v), Some(3));
    assert_eq!(t.slot_hashed(&ours.hash(n("h3"))), None);
    // Removed by a name hashed with either keys: gone, its quota unit back.
    let held = t.count(0).held;
    assert_eq!(t.remove_hashed(&ours.hash(n("h4"))), Some((n("h4"), 0, 4)));
    assert_eq!(t.remove_hashed(&other.hash(n("h5"))).map(|(_, _, v)| v), Some(5));
    assert_eq!(t.count(0).held, held - 2);
    for gone in ["h4", "h5"] {
        assert!(t.get(gone).is_none() && t.get_hashed(&ours.hash(n(gone))).is_none(), "{gone}");
    }
    // A reserved name is not removed (only `abort` ends a reservation).
    let r = t.reserve_hashed(&ours.hash(n("held")), 0).unwrap();
    assert_eq!(t.remove_hashed(&ours.hash(n("held"))), None);
    assert!(t.get_hashed(&ours.hash(n("held"))).is_none(), "reserved, not committed");
    t.abort(r);
}

#[test]
fn reserve_commit_get_remove() {
    let mut t = table(2, 4, 1);
    assert_eq!(t.capacity(), 9);
    let r = t.reserve(n("a"), 0).unwrap();
    assert_eq!(r.name(), &n("a"));
    assert!(t.get("a").is_none(), "a reservation is not found by lookups");
    assert!(t.is_reserved("a"));
    assert_eq!(t.count(0), Count { held: 1, reserved: 1 });
    t.commit(r, 7).unwrap();
    let e = t.get("a").unwrap();
    assert_eq!((e.owner, *e.value, e.name.as_str()), (0, 7, "a"));
    assert_eq!(t.count(0), Count { held: 1, reserved: 0 });
    *t.get_mut("a").unwrap() = 8;
    assert_eq!(t.remove("a"), Some((n("a"), 0, 8)));
    assert!(t.get("a").is_none());
    assert_eq!(t.count(0), Count::default());
    assert_eq!((t.len(), t.reserved()), (0, 0));
}

#[test]
fn a_reserved_name_is_taken_for_every_creator() {
    let mut t = table(2, 4, 1);
    let victim = t.reserve(n("secret"), 0).unwrap();
    // The attacker's ExMap create goes through the same reserve: refused.
    assert_eq!(t.reserve(n("secret"), 1), Err(Error::Taken));
    assert_eq!(t.reserve(n("secret"), 0), Err(Error::Taken));
    assert_eq!(t.reserve(n("secret"), SYSTEM), Err(Error::Taken));
    // Nor can anyone remove the reservation.
    assert_eq!(t.remove("secret"), None);
    assert!(t.is_reserved("secret"));
    t.commit(victim, 1).unwrap();
    assert_eq!(t.reserve(n("secret"), 1), Err(Error::Taken));
    assert_eq!(t.get("secret").unwrap().owner, 0);
    assert_eq!(t.count(1), Count::default(), "refusals charge nothing");
}

#[test]
fn abort_frees_the_name_and_the_quota() {
    let mut t = table(1, 1, 0);
    let r = t.reserve(n("x"), 0).unwrap();
    assert_eq!(t.reserve(n("y"), 0), Err(Error::Quota));
    t.abort(r);
    assert!(!t.is_reserved("x"));
    assert_eq!(t.count(0), Count::default());
    let r = t.reserve(n("x"), 0).unwrap();
    t.commit(r, 0).unwrap();
}

#[test]
fn quotas_are_per_owner_and_count_reservations() {
    let mut t = table(3, 3, 2);
    let a = t.reserve(n("a0"), 0).unwrap();
    put(&mut t, n("a1"), 0, 1);
    let _a2 = t.reserve(n("a2"), 0).unwrap();
    assert_eq!(t.reserve(n("a3"), 0), Err(Error::Quota));
    // The others are not affected.
    for o in 1..3 {
        for k in 0..3 {
            put(&mut t, n(&std::format!("o{o}-{k}")), o, 0);
        }
        assert_eq!(t.reserve(n(&std::format!("o{o}-x")), o), Err(Error::Quota));
    }
    put(&mut t, n("s0"), SYSTEM, 0);
    put(&mut t, n("s1"), SYSTEM, 0);
    assert_eq!(t.reserve(n("s2"), SYSTEM), Err(Error::Quota));
    assert_eq!(t.reserve(n("z"), 3), Err(Error::NoOwner));
    assert_eq!(t.reserve(n("z"), 1000), Err(Error::NoOwner));
    // A taken name answers Taken before the quota is looked at.
    assert_eq!(t.reserve(n("a1"), 0), Err(Error::Taken));
    t.commit(a, 0).unwrap();
    t.remove("a0").unwrap();
    put(&mut t, n("a3"), 0, 3);
}

/// Every owner filling its quota fills the table exactly: no owner within its quota is ever
/// refused for lack of room (issue 20 item 13: 28 guests could deny all others).
#[test]
fn the_table_holds_the_sum_of_the_quotas() {
    let (owners, quota, system) = (60, 64, 64);
    let mut t: Names<u64> = Names::try_new(Limits { owners, quota, system }, SEED).unwrap();
    assert_eq!(t.capacity(), 60 * 64 + 64);
    let before = t.heap_bytes();
    for k in 0..quota {
        for o in (0..owners).chain([SYSTEM]) {
            let name = n(&std::format!("g{o}-{k}"));
            let r = t.reserve(name, o).unwrap_or_else(|e| panic!("owner {o} refused at {k}: {e}"));
            if k % 2 == 0 {
                t.commit(r, k as u64).unwrap();
            } else {
                let _left_reserved = r;
            }
        }
    }
    assert_eq!(t.len() + t.reserved(), t.capacity());
    assert_eq!(t.reserve(n("one-more"), 0), Err(Error::Quota));
    assert_eq!(t.heap_bytes(), before, "no allocation after try_new");
}

/// Create and destroy far more names than the table holds, with one alive at a time (issue
/// 20 item 4: per-region state that is never removed): the table's memory does not move.
#[test]
fn churn_does_not_grow_the_table() {
    let mut t = table(2, 2, 0);
    let before = t.heap_bytes();
    for i in 0..20_000u64 {
        let name = n(&std::format!("r{i}"));
        let r = t.reserve(name, (i % 2) as u32).unwrap();
        if i % 3 == 0 {
            t.abort(r);
        } else {
            t.commit(r, i).unwrap();
            assert_eq!(t.remove(&name).map(|(_, _, v)| v), Some(i));
        }
    }
    assert_eq!(t.heap_bytes(), before);
    assert_eq!((t.len(), t.reserved(), t.count(0), t.count(1)), (0, 0, Count::default(), Count::default()));
    // Still usable to the full capacity.
    for i in 0..4u32 {
        put(&mut t, n(&std::format!("e{i}")), i / 2, 0);
    }
    assert_eq!(t.len(), 4);
}

/// A ticket for a slot that holds something else is refused (and in debug builds it is a
/// loud bug): the entry is never replaced.
#[test]
#[cfg_attr(debug_assertions, should_panic(expected = "stale reservation"))]
fn a_stale_commit_never_replaces() {
    let mut t = table(2, 2, 0);
    let r = t.reserve(n("v"), 0).unwrap();
    let forged = Ticket { slot: r.slot, gen: r.gen, name: r.name, owner: 1 };
    t.commit(r, 1).unwrap();
    assert_eq!(t.commit(forged, 2), Err((Error::Stale, 2)));
    assert_eq!(t.get("v").map(|e| (e.owner, *e.value)), Some((0, 1)));
}

#[test]
fn an_empty_table_refuses() {
    let mut t = table(0, 0, 0);
    assert_eq!(t.capacity(), 0);
    assert_eq!(t.reserve(n("a"), 0), Err(Error::NoOwner));
    assert_eq!(t.reserve(n("a"), SYSTEM), Err(Error::Quota));
    assert!(Names::<u8>::try_new(Limits { owners: u32::MAX, quota: 2, system: 0 }, SEED).is_err());
}

/// One operation of the property test.
#[derive(Clone, Debug)]
enum Op {
    Reserve(u8, u32),
    Commit(usize),
    Abort(usize),
    Remove(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..12, 0u32..4).prop_map(|(k, o)| Op::Reserve(k, if o == 3 { SYSTEM } else { o })),
        (0usize..8).prop_map(Op::Commit),
        (0usize..8).prop_map(Op::Abort),
        (0u8..12).prop_map(Op::Remove),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Model {
    Reserved(Owner),
    Named(Owner, u64),
}

proptest! {
    /// The table against a plain map: same answers, same counts, and the quotas' sum is
    /// never exceeded.
    #[test]
    fn table_matches_a_model(ops in proptest::collection::vec(op(), 1..200)) {
        let (owners, quota, system) = (3, 3, 2);
        let mut t: Names<u64> = Names::try_new(Limits { owners, quota, system }, SEED).unwrap();
        let mut model: HashMap<String, Model> = HashMap::new();
        let mut tickets: Vec<Ticket> = Vec::new();
        let mut next = 0u64;
        for op in ops {
            match op {
                Op::Reserve(k, o) => {
                    let name = std::format!("n{k}");
                    let held = model.values().filter(|m| matches!(m, Model::Reserved(x) | Model::Named(x, _) if *x == o)).count() as u32;
                    let want = if model.contains_key(&name) { Err(Error::Taken) }
                        else if o != SYSTEM && o >= owners { Err(Error::NoOwner) }
                        else if held >= if o == SYSTEM { system } else { quota } { Err(Error::Quota) }
                        else { Ok(()) };
                    let got = t.reserve(n(&name), o);
                    prop_assert_eq!(got.as_ref().map(|_| ()).map_err(|e| *e), want);
                    if let Ok(r) = got {
                        model.insert(name, Model::Reserved(o));
                        tickets.push(r);
                    }
                }
                Op::Commit(i) if i < tickets.len() => {
                    let r = tickets.swap_remove(i);
                    let name = r.name().to_string();
                    let o = r.owner();
                    next += 1;
                    prop_assert!(t.commit(r, next).is_ok());
                    model.insert(name, Model::Named(o, next));
                }
                Op::Abort(i) if i < tickets.len() => {
                    let r = tickets.swap_remove(i);
                    model.remove(r.name().as_str());
                    t.abort(r);
                }
                Op::Remove(k) => {
                    let name = std::format!("n{k}");
                    let want = match model.get(&name) {
                        Some(Model::Named(o, v)) => Some((n(&name), *o, *v)),
                        _ => None,
                    };
                    prop_assert_eq!(t.remove(&name), want);
                    if want.is_some() {
                        model.remove(&name);
                    }
                }
                _ => {}
            }
            for k in 0..12 {
                let name = std::format!("n{k}");
                let want = match model.get(&name) {
                    Some(Model::Named(o, v)) => Some((*o, *v)),
                    _ => None,
                };
                prop_assert_eq!(t.get(&name).map(|e| (e.owner, *e.value)), want);
                prop_assert_eq!(t.is_reserved(&name), matches!(model.get(&name), Some(Model::Reserved(_))));
            }
            for o in (0..owners).chain([SYSTEM]) {
                let held = model.values().filter(|m| matches!(m, Model::Reserved(x) | Model::Named(x, _) if *x == o)).count() as u32;
                let reserved = model.values().filter(|m| matches!(m, Model::Reserved(x) if *x == o)).count() as u32;
                prop_assert_eq!(t.count(o), Count { held, reserved });
            }
            prop_assert_eq!(t.len() + t.reserved(), model.len());
            prop_assert_eq!(t.iter().count(), t.len());
        }
    }
}
