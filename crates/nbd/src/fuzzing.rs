//! Checks shared by the cargo-fuzz targets (`fuzz/`) and the corpus replay
//! test (`tests/it/fuzz_corpus.rs`). Not part of the API: panics are the point.

use crate::wire::{
    CLIENT_FLAGS_LEN, Command, ExportLimits, OPTION_HEADER_LEN, REQUEST_LEN, Refusal,
    check_request, encode_client_flags, encode_info_request, encode_option_header, encode_request,
    parse_client_flags, parse_export_name, parse_info_request, parse_option_header, parse_request,
};

/// Runs every NBD parser over `data`. Whatever parses must encode back to the
/// input, and the request policy must never let a read or write outside the
/// export or over the size cap through.
pub fn check_wire_parsing(data: &[u8]) {
    if let Some(bytes) = data.first_chunk::<REQUEST_LEN>()
        && let Ok(request) = parse_request(bytes)
    {
        assert_eq!(&encode_request(&request), bytes, "request re-encodes");
        // The export the request is checked against comes from the next bytes.
        let rest = &data[REQUEST_LEN..];
        let size_bytes = rest
            .first_chunk::<8>()
            .map_or(1 << 20, |b| u64::from_le_bytes(*b));
        let request_bytes_max = rest
            .get(8..12)
            .map_or(1 << 16, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let read_only = rest.get(12).is_some_and(|b| b & 1 == 1);
        let export = ExportLimits {
            size_bytes,
            read_only,
            request_bytes_max,
        };
        match check_request(&request, &export) {
            Ok(()) => {
                if matches!(request.command, Command::Read | Command::Write) {
                    let end = request.offset.checked_add(u64::from(request.length));
                    assert!(
                        end.is_some_and(|end| end <= size_bytes),
                        "{request:?} passed"
                    );
                    assert!(request.length <= request_bytes_max, "{request:?} passed");
                }
                if matches!(
                    request.command,
                    Command::Write | Command::WriteZeroes | Command::Trim
                ) {
                    assert!(!read_only, "{request:?} passed on a read-only export");
                }
            }
            Err(Refusal::Disconnect) => {
                assert!(request.command == Command::Write && request.length > request_bytes_max);
            }
            Err(Refusal::Reply(_)) => {}
        }
    }
    if let Some(bytes) = data.first_chunk::<OPTION_HEADER_LEN>()
        && let Ok(header) = parse_option_header(bytes)
    {
        assert_eq!(
            &encode_option_header(header),
            bytes,
            "option header re-encodes"
        );
    }
    if let Some(bytes) = data.first_chunk::<CLIENT_FLAGS_LEN>()
        && let Ok(flags) = parse_client_flags(bytes)
    {
        assert_eq!(&encode_client_flags(flags), bytes, "client flags re-encode");
    }
    if let Ok(request) = parse_info_request(data) {
        assert_eq!(
            encode_info_request(&request),
            data,
            "info request re-encodes"
        );
    }
    if let Ok(name) = parse_export_name(data) {
        assert_eq!(name.as_bytes(), data, "export name is the whole data");
    }
}
