//! The wire format's tests: every header round-trips, every parser refuses
//! short, long and out-of-range input, and none panics on any bytes.

use super::*;
use proptest::prelude::*;

fn export(size_bytes: u64, read_only: bool) -> ExportLimits {
    ExportLimits {
        size_bytes,
        read_only,
        request_bytes_max: 1 << 20,
    }
}

fn request(command: Command, flags: u16, offset: u64, length: u32) -> Request {
    Request {
        flags,
        command,
        handle: 7,
        offset,
        length,
    }
}

#[test]
fn greeting_is_nbdmagic_ihaveopt_and_both_flags() {
    assert_eq!(&encode_greeting(), b"NBDMAGICIHAVEOPT\x00\x03");
}

#[test]
fn request_header_layout_matches_the_protocol() {
    let bytes = encode_request(&request(Command::Write, COMMAND_FLAG_FUA, 0x1122, 0x33));
    assert_eq!(
        bytes,
        [
            0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0x11,
            0x22, 0, 0, 0, 0x33
        ]
    );
}

/// The numbers of the NBD protocol (`doc/proto.md` of the reference
/// implementation): a wrong row in a wire table would pass every round trip.
#[test]
fn wire_enum_values_are_the_protocols() {
    let options = [
        (OptionType::ExportName, 1),
        (OptionType::Abort, 2),
        (OptionType::List, 3),
        (OptionType::StartTls, 5),
        (OptionType::Info, 6),
        (OptionType::Go, 7),
        (OptionType::StructuredReply, 8),
    ];
    for (option, value) in options {
        assert_eq!(option.to_u32(), value);
        assert_eq!(OptionType::from_u32(value), option);
    }
    assert_eq!(OptionType::from_u32(4), OptionType::Other(4));
    assert_eq!(OptionType::from_u32(9), OptionType::Other(9));

    let commands = [
        (Command::Read, 0),
        (Command::Write, 1),
        (Command::Disc, 2),
        (Command::Flush, 3),
        (Command::Trim, 4),
        (Command::WriteZeroes, 6),
    ];
    for (command, value) in commands {
        assert_eq!(command.to_u16(), value);
        assert_eq!(Command::from_u16(value), command);
    }
    assert_eq!(Command::from_u16(5), Command::Other(5));
    assert_eq!(Command::from_u16(7), Command::Other(7));

    let errors = [
        (ErrorCode::Perm, 1),
        (ErrorCode::Io, 5),
        (ErrorCode::Inval, 22),
        (ErrorCode::NoSpc, 28),
        (ErrorCode::Shutdown, 108),
    ];
    for (code, value) in errors {
        assert_eq!(code.to_u32(), value);
    }
}

#[test]
fn bad_request_magic_is_an_error() {
    let mut bytes = encode_request(&request(Command::Read, 0, 0, 512));
    bytes[0] ^= 1;
    assert!(matches!(
        parse_request(&bytes),
        Err(WireError::BadMagic { .. })
    ));
}

#[test]
fn client_flags_the_server_did_not_offer_are_refused() {
    assert_eq!(
        parse_client_flags(&[0, 0, 0, 3]),
        Ok(ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true
        })
    );
    assert_eq!(
        parse_client_flags(&[0, 0, 0, 4]),
        Err(WireError::UnknownClientFlags(4))
    );
}

#[test]
fn info_request_with_name_and_types_parses() {
    let data = [0, 0, 0, 2, b'v', b'1', 0, 2, 0, 3, 0, 1];
    assert_eq!(
        parse_info_request(&data),
        Ok(InfoRequest {
            name: "v1".into(),
            info_types: vec![INFO_BLOCK_SIZE, INFO_NAME]
        })
    );
}

#[test]
fn info_request_length_mismatches_are_errors() {
    // Name longer than the data.
    assert!(matches!(
        parse_info_request(&[0, 0, 0, 9, b'a']),
        Err(WireError::Truncated { .. })
    ));
    // Missing request count.
    assert!(matches!(
        parse_info_request(&[0, 0, 0, 1, b'a']),
        Err(WireError::Truncated { .. })
    ));
    // Trailing byte after the requests.
    assert_eq!(
        parse_info_request(&[0, 0, 0, 0, 0, 0, 9]),
        Err(WireError::TrailingBytes(1))
    );
    // A name length near u32::MAX must not overflow.
    assert_eq!(
        parse_info_request(&[0xff, 0xff, 0xff, 0xff]),
        Err(WireError::StringTooLong(0xffff_ffff))
    );
    // NUL inside the name.
    assert_eq!(
        parse_info_request(&[0, 0, 0, 1, 0, 0, 0]),
        Err(WireError::BadString)
    );
}

#[test]
fn export_name_reply_pads_unless_no_zeroes() {
    assert_eq!(encode_export_name_reply(1, 1, false).len(), 134);
    assert_eq!(encode_export_name_reply(1, 1, true).len(), 10);
}

#[test]
fn reads_past_the_end_or_too_large_are_einval() {
    let e = export(4096, false);
    assert_eq!(
        check_request(&request(Command::Read, 0, 0, 4096), &e),
        Ok(())
    );
    assert_eq!(
        check_request(&request(Command::Read, 0, 1, 4096), &e),
        Err(Refusal::Reply(ErrorCode::Inval))
    );
    assert_eq!(
        check_request(&request(Command::Read, 0, u64::MAX, 1), &e),
        Err(Refusal::Reply(ErrorCode::Inval))
    );
    let big = export(u64::MAX, false);
    assert_eq!(
        check_request(&request(Command::Read, 0, 0, (1 << 20) + 1), &big),
        Err(Refusal::Reply(ErrorCode::Inval))
    );
}

#[test]
fn writes_are_checked_for_size_then_flags_then_permission_then_bounds() {
    let e = export(4096, false);
    assert_eq!(
        check_request(&request(Command::Write, 0, 0, (1 << 20) + 1), &e),
        Err(Refusal::Disconnect)
    );
    assert_eq!(
        check_request(&request(Command::Write, COMMAND_FLAG_NO_HOLE, 0, 1), &e),
        Err(Refusal::Reply(ErrorCode::Inval))
    );
    assert_eq!(
        check_request(&request(Command::Write, 0, 0, 1), &export(4096, true)),
        Err(Refusal::Reply(ErrorCode::Perm))
    );
    assert_eq!(
        check_request(&request(Command::Write, 0, 4095, 2), &e),
        Err(Refusal::Reply(ErrorCode::NoSpc))
    );
    assert_eq!(
        check_request(&request(Command::Write, COMMAND_FLAG_FUA, 4095, 1), &e),
        Ok(())
    );
}

#[test]
fn zeroes_and_trims_are_not_capped_by_request_bytes_max() {
    let e = export(u64::MAX, false);
    let zero = request(Command::WriteZeroes, COMMAND_FLAG_NO_HOLE, 0, u32::MAX);
    assert_eq!(check_request(&zero, &e), Ok(()));
    assert_eq!(
        check_request(&request(Command::Trim, 0, 0, u32::MAX), &e),
        Ok(())
    );
    assert_eq!(
        check_request(&request(Command::Trim, 0, 0, 1), &export(1, true)),
        Err(Refusal::Reply(ErrorCode::Perm))
    );
}

#[test]
fn unknown_commands_are_einval() {
    assert_eq!(
        check_request(&request(Command::Other(5), 0, 0, 0), &export(1, false)),
        Err(Refusal::Reply(ErrorCode::Inval))
    );
}

proptest! {
    #[test]
    fn request_parsing_never_panics(bytes in proptest::array::uniform28(any::<u8>())) {
        let _ = parse_request(&bytes);
    }

    #[test]
    fn option_header_parsing_never_panics(bytes in proptest::array::uniform16(any::<u8>())) {
        let _ = parse_option_header(&bytes);
    }

    #[test]
    fn option_data_parsing_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = parse_info_request(&data);
        let _ = parse_export_name(&data);
    }

    #[test]
    fn structured_option_data_parsing_never_panics(
        name_len in 0u32..16,
        name in proptest::collection::vec(any::<u8>(), 0..16),
        count in 0u16..8,
        tail in proptest::collection::vec(any::<u8>(), 0..20),
    ) {
        // Random bytes rarely get past the first length; this shapes them.
        let mut data = name_len.to_be_bytes().to_vec();
        data.extend_from_slice(&name);
        data.extend_from_slice(&count.to_be_bytes());
        data.extend_from_slice(&tail);
        let _ = parse_info_request(&data);
    }

    #[test]
    fn check_request_never_panics(
        bytes in proptest::array::uniform28(any::<u8>()),
        size_bytes in any::<u64>(),
        read_only in any::<bool>(),
        request_bytes_max in any::<u32>(),
    ) {
        let mut bytes = bytes;
        bytes[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        let request = parse_request(&bytes).expect("magic was set");
        let limits = ExportLimits { size_bytes, read_only, request_bytes_max };
        if check_request(&request, &limits).is_ok() && request.command == Command::Read {
            // An accepted read lies inside the export and under the cap.
            prop_assert!(request.length <= request_bytes_max);
            prop_assert!(request.offset + u64::from(request.length) <= size_bytes);
        }
    }

    #[test]
    fn request_round_trips(
        flags in any::<u16>(), command in any::<u16>(), handle in any::<u64>(),
        offset in any::<u64>(), length in any::<u32>(),
    ) {
        let request = Request { flags, command: Command::from_u16(command), handle, offset, length };
        let bytes = encode_request(&request);
        prop_assert_eq!(parse_request(&bytes), Ok(request));
        prop_assert_eq!(request.command.to_u16(), command);
    }

    #[test]
    fn request_bytes_round_trip(bytes in proptest::array::uniform28(any::<u8>())) {
        if let Ok(request) = parse_request(&bytes) {
            prop_assert_eq!(encode_request(&request), bytes);
        }
    }

    #[test]
    fn option_header_round_trips(option in any::<u32>(), length in any::<u32>()) {
        let header = OptionHeader { option: OptionType::from_u32(option), length };
        prop_assert_eq!(parse_option_header(&encode_option_header(header)), Ok(header));
        prop_assert_eq!(header.option.to_u32(), option);
    }

    #[test]
    fn info_request_round_trips(
        name in "[a-z0-9._-]{0,40}",
        info_types in proptest::collection::vec(any::<u16>(), 0..INFO_REQUESTS_MAX),
    ) {
        let request = InfoRequest { name, info_types };
        prop_assert_eq!(parse_info_request(&encode_info_request(&request)), Ok(request));
    }

    #[test]
    fn simple_reply_round_trips(error in any::<u32>(), handle in any::<u64>()) {
        let reply = SimpleReply { error, handle };
        prop_assert_eq!(parse_simple_reply(&encode_simple_reply(reply)), Ok(reply));
    }

    #[test]
    fn option_reply_round_trips(
        option in any::<u32>(), reply_type in any::<u32>(),
        data in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut out = Vec::new();
        encode_option_reply(option, reply_type, &data, &mut out);
        let header: [u8; OPTION_REPLY_HEADER_LEN] =
            out[..OPTION_REPLY_HEADER_LEN].try_into().expect("header length");
        let parsed = parse_option_reply_header(&header).expect("own magic");
        prop_assert_eq!(parsed.option, option);
        prop_assert_eq!(parsed.reply_type, reply_type);
        prop_assert_eq!(parsed.length as usize, data.len());
        prop_assert_eq!(&out[OPTION_REPLY_HEADER_LEN..], &data[..]);
    }
}
