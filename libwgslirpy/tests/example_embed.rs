//! Runs the `embed` example's exchange, so that the example cannot rot:
//! `cargo test` builds it and checks what it prints. Loopback only.

#[allow(dead_code)]
#[path = "../examples/embed.rs"]
mod embed;

#[test]
fn the_embed_example_gets_its_three_answers() {
    let lines = embed::run().expect("the example runs");
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert_eq!(lines[0], "ICMP echo reply 10.0.2.1 -> 10.0.2.15: \"ping\"");
    assert!(
        lines[1].starts_with("DNS answer 10.0.2.1:53 -> 10.0.2.15:5353: rcode 0, "),
        "{lines:#?}"
    );
    assert!(lines[2].starts_with("UDP 10.0.2.2:"), "{lines:#?}");
    assert!(
        lines[2].ends_with("-> 10.0.2.15:40000: \"hello through the router\""),
        "{lines:#?}"
    );
}
