use proptest::prelude::*;

use super::*;

const A: &str = "https://a:7600";
const B: &str = "https://b:7600";
const C: &str = "https://c:7600";

fn rotation(addrs: &[&str]) -> Rotation {
    Rotation::new(addrs.iter().map(|a| (*a).to_owned()).collect())
}

/// Records `outcome` and returns the step and where it leads.
fn step(r: &mut Rotation, outcome: Outcome<'_>) -> (Step, String) {
    let step = r.record(outcome);
    (step, r.current().to_owned())
}

#[test]
fn lists_split_on_commas_and_repeats() {
    assert_eq!(
        split_addresses(&["https://a:7600, https://b:7600/", "https://c:7600"]),
        [A, B, C]
    );
    assert_eq!(
        split_addresses(&["https://a:7600,,https://a:7600", " "]),
        [A]
    );
    assert!(split_addresses::<&str>(&[]).is_empty());
    // One address is read as it always was.
    assert_eq!(
        split_addresses(&["http://127.0.0.1:7600"]),
        ["http://127.0.0.1:7600"]
    );
}

#[test]
fn schemes_are_checked_and_named() {
    let list = |s: &[&str]| s.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
    assert_eq!(check_schemes("--server", &list(&[A, B])), Ok(true));
    assert_eq!(
        check_schemes("--server", &list(&["http://a:1", "http://b:1"])),
        Ok(false)
    );
    let mixed = check_schemes("--server", &list(&[A, "http://b:7600"])).unwrap_err();
    assert!(
        mixed.starts_with("--server mixes https:// and http://"),
        "{mixed}"
    );
    assert!(mixed.contains("http://b:7600"), "{mixed}");
    let bare = check_schemes("--server", &list(&["a:7600"])).unwrap_err();
    assert!(
        bare.contains("\"a:7600\" is not an http:// or https://"),
        "{bare}"
    );
    assert!(check_schemes("--server", &list(&["ftp://a"])).is_err());
    assert!(check_schemes("--server", &list(&["https://"])).is_err());
    assert!(
        check_schemes("--server", &[])
            .unwrap_err()
            .contains("names no server")
    );
}

#[test]
fn one_address_backs_off_after_every_attempt_as_before() {
    let mut r = rotation(&[A]);
    assert_eq!(r.current(), A);
    assert_eq!(step(&mut r, Outcome::Failed), (Step::Wait, A.into()));
    assert_eq!(step(&mut r, Outcome::Ended(None)), (Step::Wait, A.into()));
    assert_eq!(step(&mut r, Outcome::Refused(None)), (Step::Wait, A.into()));
    // A hint naming the only address, which was just tried: wait.
    assert_eq!(
        step(&mut r, Outcome::Refused(Some(A))),
        (Step::Wait, A.into())
    );
}

#[test]
fn failures_walk_the_list_and_wait_once_per_round() {
    let mut r = rotation(&[A, B, C]);
    assert_eq!(step(&mut r, Outcome::Failed), (Step::Now, B.into()));
    assert_eq!(step(&mut r, Outcome::Failed), (Step::Now, C.into()));
    assert_eq!(step(&mut r, Outcome::Failed), (Step::Wait, A.into()));
    // The next round is whole again.
    assert_eq!(step(&mut r, Outcome::Failed), (Step::Now, B.into()));
    assert_eq!(step(&mut r, Outcome::Failed), (Step::Now, C.into()));
    assert_eq!(step(&mut r, Outcome::Failed), (Step::Wait, A.into()));
}

#[test]
fn a_refusal_sends_the_client_to_the_leader_it_names_first() {
    let mut r = rotation(&[A, B, C]);
    assert_eq!(
        step(&mut r, Outcome::Refused(Some(C))),
        (Step::Now, C.into())
    );
    // The leader is down: the rest of the list, then a wait.
    assert_eq!(step(&mut r, Outcome::Failed), (Step::Now, B.into()));
    // C failed since it was named, so the next round starts by the list,
    // after B.
    assert_eq!(step(&mut r, Outcome::Refused(None)), (Step::Wait, C.into()));
}

#[test]
fn a_hint_is_compared_as_the_list_spells_it() {
    let mut r = rotation(&[A, B]);
    assert_eq!(
        step(&mut r, Outcome::Refused(Some(" https://b:7600/ "))),
        (Step::Now, B.into())
    );
}

#[test]
fn a_round_that_ended_on_a_named_leader_starts_there() {
    let mut r = rotation(&[A, B, C]);
    assert_eq!(
        step(&mut r, Outcome::Refused(Some(C))),
        (Step::Now, C.into())
    );
    // C refuses too, having lost the lead to A (already tried this round).
    assert_eq!(
        step(&mut r, Outcome::Refused(Some(A))),
        (Step::Now, B.into())
    );
    assert_eq!(step(&mut r, Outcome::Failed), (Step::Wait, A.into()));
}

#[test]
fn hints_that_chase_each_other_end_the_round() {
    let mut r = rotation(&[A, B]);
    assert_eq!(
        step(&mut r, Outcome::Refused(Some(B))),
        (Step::Now, B.into())
    );
    assert_eq!(
        step(&mut r, Outcome::Refused(Some(A))),
        (Step::Wait, A.into())
    );
    // A standby naming itself is not followed back to itself.
    let mut r = rotation(&[A, B]);
    assert_eq!(
        step(&mut r, Outcome::Refused(Some(A))),
        (Step::Now, B.into())
    );
}

#[test]
fn an_unlisted_leader_of_the_same_scheme_is_followed() {
    let mut r = rotation(&[A, B]);
    let x = "https://10.0.0.9:7600";
    assert!(r.accepts(x));
    assert_eq!(
        step(&mut r, Outcome::Refused(Some(x))),
        (Step::Now, x.into())
    );
    // Down: the list goes on from where it was.
    assert_eq!(step(&mut r, Outcome::Failed), (Step::Now, B.into()));
    assert_eq!(step(&mut r, Outcome::Failed), (Step::Wait, A.into()));
}

#[test]
fn a_leader_of_another_scheme_or_no_url_is_not_followed() {
    let mut r = rotation(&[A, B]);
    for bad in [
        "http://a:7600",
        "a:7600",
        "https://",
        "https://x y",
        "ftp://x",
    ] {
        assert!(!r.accepts(bad), "{bad}");
    }
    assert_eq!(
        step(&mut r, Outcome::Refused(Some("http://x:7600"))),
        (Step::Now, B.into())
    );
    let r = rotation(&["http://a:7600"]);
    assert!(r.accepts("http://x:7600"));
    assert!(!r.accepts("https://x:7600"));
}

#[test]
fn unlisted_detours_are_bounded_per_round() {
    let mut r = rotation(&[A, B]);
    let hints: Vec<String> = (0..10).map(|i| format!("https://x{i}:7600")).collect();
    let mut attempts = 1;
    let mut i = 0;
    while r.record(Outcome::Refused(Some(&hints[i]))) == Step::Now {
        attempts += 1;
        i += 1;
    }
    // Two listed addresses, two detours.
    assert_eq!(attempts, 4);
}

#[test]
fn a_session_that_ends_tries_the_others_then_waits() {
    let mut r = rotation(&[A, B, C]);
    assert_eq!(
        step(&mut r, Outcome::Refused(Some(B))),
        (Step::Now, B.into())
    );
    // Welcomed at B, and later lost: the others at once, then B first
    // again after the wait.
    assert_eq!(step(&mut r, Outcome::Ended(None)), (Step::Now, C.into()));
    assert_eq!(
        step(&mut r, Outcome::Refused(Some(B))),
        (Step::Now, A.into())
    );
    assert_eq!(step(&mut r, Outcome::Failed), (Step::Wait, B.into()));
}

#[test]
fn a_session_ended_by_a_standby_goes_to_the_new_leader() {
    let mut r = rotation(&[A, B, C]);
    assert_eq!(step(&mut r, Outcome::Ended(Some(C))), (Step::Now, C.into()));
    // Even a leader tried earlier, since the round began at the end.
    let mut r = rotation(&[A, B]);
    assert_eq!(
        step(&mut r, Outcome::Refused(Some(B))),
        (Step::Now, B.into())
    );
    assert_eq!(step(&mut r, Outcome::Ended(Some(A))), (Step::Now, A.into()));
}

#[test]
fn a_call_s_round_starts_where_the_last_call_was_answered() {
    let mut r = rotation(&[A, B, C]);
    assert_eq!(
        step(&mut r, Outcome::Refused(Some(B))),
        (Step::Now, B.into())
    );
    // bh: B answered; the next call starts there with a fresh round.
    r.begin();
    assert_eq!(r.current(), B);
    assert_eq!(step(&mut r, Outcome::Failed), (Step::Now, C.into()));
    assert_eq!(step(&mut r, Outcome::Failed), (Step::Now, A.into()));
    assert_eq!(step(&mut r, Outcome::Failed), (Step::Wait, B.into()));
}

#[derive(Debug, Clone)]
enum Event {
    Failed,
    Refused(Option<usize>),
    Ended(Option<usize>),
}

/// Hints drawn from the list, unlisted addresses of its scheme, another
/// scheme and junk.
const POOL: [&str; 8] = [
    A,
    B,
    C,
    "https://x:7600",
    "https://y:7600",
    "http://a:7600",
    "nonsense",
    "https://a:7600/",
];

fn event() -> impl Strategy<Value = Event> {
    let hint = proptest::option::of(0..POOL.len());
    prop_oneof![
        4 => Just(Event::Failed),
        4 => hint.clone().prop_map(Event::Refused),
        1 => hint.prop_map(Event::Ended),
    ]
}

proptest! {
    /// Whatever servers answer: each round tries an address at most once,
    /// is at most listed + detours (+ the address that served) long, and
    /// waits only once every listed address was tried; the client is only
    /// ever sent to a listed address or an accepted hint.
    #[test]
    fn rounds_are_bounded_and_cover_the_list(
        n in 1usize..=3,
        events in proptest::collection::vec(event(), 1..200),
    ) {
        let listed: Vec<String> = POOL[..n].iter().map(|a| (*a).to_owned()).collect();
        let mut r = Rotation::new(listed.clone());
        let mut round: Vec<String> = Vec::new();
        for e in events {
            let at = r.current().to_owned();
            prop_assert!(listed.contains(&at) || r.accepts(&at), "sent to {at}");
            let outcome = match e {
                Event::Failed => Outcome::Failed,
                Event::Refused(h) => Outcome::Refused(h.map(|i| POOL[i])),
                Event::Ended(h) => {
                    round.clear();
                    Outcome::Ended(h.map(|i| POOL[i]))
                }
            };
            prop_assert!(!round.contains(&at), "{at} twice in one round: {round:?}");
            round.push(at);
            prop_assert!(round.len() <= 2 * n + 1, "{round:?}");
            match r.record(outcome) {
                Step::Now => {}
                Step::Wait => {
                    for a in &listed {
                        prop_assert!(round.contains(a), "waited before trying {a}: {round:?}");
                    }
                    round.clear();
                }
            }
        }
    }
}
