use super::*;
use boilerhouse_core::container::ContainerSpec;

#[test]
fn timestamps_round_trip_including_before_the_epoch() {
    for ms in [0, 1, 999, 1_700_000_000_123, -1, -1001] {
        let t = Timestamp::from_millis(ms);
        assert_eq!(timestamp_from_pb(&timestamp_to_pb(t)), t, "{ms}");
        let pb = timestamp_to_pb(t);
        assert!(
            (0..1_000_000_000).contains(&pb.nanos),
            "nanos normalised for {ms}"
        );
    }
}

#[test]
fn negative_durations_are_invalid() {
    let err = duration_from_pb(
        "acquire_timeout",
        &prost_types::Duration {
            seconds: -1,
            nanos: 0,
        },
    )
    .unwrap_err();
    assert_eq!(err.field(), "acquire_timeout");
    assert_eq!(
        duration_from_pb("d", &duration_to_pb(Duration::from_millis(1500))).unwrap(),
        Duration::from_millis(1500)
    );
}

#[test]
fn ids_name_their_field() {
    assert_eq!(
        tenant_id("tenant_id", "").unwrap_err(),
        ConvertError::MissingField("tenant_id")
    );
    assert_eq!(
        tenant_id("tenant_id", "a/b").unwrap_err().field(),
        "tenant_id"
    );
    assert_eq!(node_id("node_id", "Bad").unwrap_err().field(), "node_id");
    assert!(request_id("").unwrap().is_none());
    assert!(request_id("abc-123").unwrap().is_some());
    assert_eq!(request_id("has space").unwrap_err().field(), "request_id");
}

#[test]
fn events_round_trip() {
    let event = Event {
        id: 7,
        event: boilerhouse_core::event::NewEvent::new(
            Timestamp::from_millis(5),
            boilerhouse_core::event::EventKind::NodeLost,
            "gone",
        )
        .with_attribute("why", "heartbeats")
        .with_subject(EventSubject {
            node_id: Some("a".into()),
            ..Default::default()
        }),
    };
    let back = Event::try_from(&pb::Event::from(&event)).unwrap();
    assert_eq!(back, event);
}

#[test]
fn container_specs_round_trip() {
    let workload = boilerhouse_core::workload::parse_workload(
        "w",
        "id: demo\nimage: busybox\nvolumes: {state: {target: /d}, custom: [{name: c, target: /c}]}\nhealthcheck: {test: [CMD, 'true']}\n",
    )
    .unwrap();
    let spec = ContainerSpec::for_workload(
        &workload,
        ContainerId::from_uuid(uuid_nil()),
        &NodeId::new("n").unwrap(),
        Timestamp::from_millis(1),
    );
    let back = ContainerSpec::try_from(&pb::ContainerSpec::from(&spec)).unwrap();
    assert_eq!(back, spec);
    let mut bad = pb::ContainerSpec::from(&spec);
    bad.volumes[0].target = "relative".into();
    assert_eq!(
        ContainerSpec::try_from(&bad).unwrap_err().field(),
        "spec.volumes[0].target"
    );
}

fn uuid_nil() -> boilerhouse_core::ids::Uuid {
    boilerhouse_core::ids::Uuid::nil()
}

#[test]
fn event_filters_validate_kinds() {
    let f = pb::EventFilter {
        kinds: vec!["node.".into(), "BAD KIND".into()],
        ..Default::default()
    };
    assert_eq!(
        event_filter_from_pb(Some(&f)).unwrap_err().field(),
        "filter.kinds[1]"
    );
    let f = pb::EventFilter {
        min_severity: 99,
        ..Default::default()
    };
    assert_eq!(
        event_filter_from_pb(Some(&f)).unwrap_err().field(),
        "filter.min_severity"
    );
}
