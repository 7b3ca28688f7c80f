//! `schema.graphql` is the exported SDL: it must equal what the code builds.

#[test]
fn schema_graphql_matches_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../schema.graphql");
    let on_disk = std::fs::read_to_string(path).unwrap_or_default();
    let built = healthd::graphql::sdl();
    if on_disk != built {
        if std::env::var_os("HEALTHD_UPDATE_SCHEMA").is_some() {
            std::fs::write(path, &built).expect("write schema.graphql");
            return;
        }
        panic!(
            "schema.graphql is out of date with the code.\n\
             Regenerate it with `cargo run -p healthd -- schema > schema.graphql` \
             (or run this test with HEALTHD_UPDATE_SCHEMA=1) and commit the result."
        );
    }
}
