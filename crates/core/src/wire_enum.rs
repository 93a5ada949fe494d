//! Wire enums declared once, from a table: each variant with its value on the
//! wire and its text. One invocation of [`wire_enum!`](crate::wire_enum) gives
//! the enum, its conversion to and from the wire integer, and `Display`, so the
//! value table and the decoding match can no longer disagree (after rustls'
//! `enum_builder!`). Both wire formats use it: the replication protocol's
//! (`blockrep-proto`) and NBD's (`blockrep-nbd`).

/// Declares a wire enum from a table of `Variant = value => "text"` rows.
///
/// Two forms, by what an unknown wire value means:
///
/// - `pub enum Name: u8 { .. }` (closed): an unknown value is refused. The
///   enum gets `#[repr]` discriminants equal to the wire values,
///   `TryFrom<u8>` (the unknown value as the error), `From<Name> for u8`, and
///   `Name::from_wire(u8) -> Option<Name>` and `Name::as_str`.
/// - `pub enum Name: u16, unknown Unknown => "text {}" { .. }` (open): an
///   unknown value is kept in `Name::Unknown(value)`, so that a newer peer's
///   value can still be reported. The enum gets `From<u16>` both ways and
///   `Name::from_wire(u16) -> Name`.
///
/// Both give `Name::to_wire(self)` and `Display` (the row's text). Either
/// header may end in `, named from_u16 / to_u16`: two more names for
/// `from_wire` and `to_wire`, for a format whose callers name the
/// conversions after the field's width.
///
/// ```
/// blockrep_core::wire_enum! {
///     /// A command, two bytes on the wire.
///     pub enum Command: u16, unknown Other => "command {}" {
///         /// Read some bytes.
///         Read = 0 => "read",
///         /// Write some bytes.
///         Write = 1 => "write",
///     }
/// }
///
/// assert_eq!(Command::from_wire(1), Command::Write);
/// assert_eq!(Command::from_wire(9), Command::Other(9));
/// assert_eq!(Command::Other(9).to_wire(), 9);
/// assert_eq!(Command::Other(9).to_string(), "command 9");
///
/// blockrep_core::wire_enum! {
///     /// A status byte, refused when unknown.
///     pub enum Status: u8, named from_u8 / to_u8 {
///         /// It worked.
///         Done = 1 => "done",
///     }
/// }
///
/// assert_eq!(Status::from_u8(1), Some(Status::Done));
/// assert_eq!(Status::from_u8(2), None);
/// assert_eq!(Status::Done.to_u8(), 1);
/// ```
#[macro_export]
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident: $repr:ident $(, named $from:ident / $to:ident)? {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr($repr)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant = $value, )+
        }

        impl $name {
            /// The value on the wire.
            $vis const fn to_wire(self) -> $repr {
                self as $repr
            }

            /// From the value on the wire; `None` when it names no variant.
            $vis const fn from_wire(value: $repr) -> Option<Self> {
                match value {
                    $( $value => Some(Self::$variant), )+
                    _ => None,
                }
            }

            /// The variant's text, as `Display` writes it.
            $vis const fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $text, )+
                }
            }
        }

        impl From<$name> for $repr {
            fn from(value: $name) -> Self {
                value.to_wire()
            }
        }

        impl TryFrom<$repr> for $name {
            /// The value that names no variant.
            type Error = $repr;

            fn try_from(value: $repr) -> Result<Self, $repr> {
                Self::from_wire(value).ok_or(value)
            }
        }

        $(
            impl $name {
                /// The same as [`Self::from_wire`].
                $vis const fn $from(value: $repr) -> Option<Self> {
                    Self::from_wire(value)
                }

                /// The same as [`Self::to_wire`].
                $vis const fn $to(self) -> $repr {
                    self.to_wire()
                }
            }
        )?

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident: $repr:ident, unknown $unknown:ident => $utext:literal
            $(, named $from:ident / $to:ident)? {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
            /// A value this build does not know, kept as it came.
            $unknown($repr),
        }

        impl $name {
            /// The value on the wire.
            $vis const fn to_wire(self) -> $repr {
                match self {
                    $( Self::$variant => $value, )+
                    Self::$unknown(value) => value,
                }
            }

            /// From the value on the wire; an unknown value is kept, not refused.
            $vis const fn from_wire(value: $repr) -> Self {
                match value {
                    $( $value => Self::$variant, )+
                    other => Self::$unknown(other),
                }
            }
        }

        impl From<$name> for $repr {
            fn from(value: $name) -> Self {
                value.to_wire()
            }
        }

        impl From<$repr> for $name {
            fn from(value: $repr) -> Self {
                Self::from_wire(value)
            }
        }

        $(
            impl $name {
                /// The same as [`Self::from_wire`]: an unknown value is kept.
                $vis const fn $from(value: $repr) -> Self {
                    Self::from_wire(value)
                }

                /// The same as [`Self::to_wire`].
                $vis const fn $to(self) -> $repr {
                    self.to_wire()
                }
            }
        )?

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                match self {
                    $( Self::$variant => f.write_str($text), )+
                    Self::$unknown(value) => ::std::write!(f, $utext, value),
                }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    wire_enum! {
        /// A closed test enum.
        pub(crate) enum Closed: u8 {
            A = 1 => "a",
            B = 7 => "b",
        }
    }

    wire_enum! {
        /// An open test enum.
        pub(crate) enum Open: u16, unknown Other => "other {}", named from_u16 / to_u16 {
            A = 1 => "a",
            B = 300 => "b",
        }
    }

    #[test]
    fn closed_enums_round_trip_and_refuse_unknown_values() {
        for value in [Closed::A, Closed::B] {
            assert_eq!(Closed::try_from(u8::from(value)), Ok(value));
        }
        assert_eq!(Closed::B.to_wire(), 7);
        assert_eq!(Closed::try_from(2), Err(2));
        assert_eq!(Closed::B.to_string(), "b");
    }

    #[test]
    fn open_enums_keep_unknown_values() {
        for value in 0..=u16::MAX {
            assert_eq!(u16::from(Open::from(value)), value);
        }
        assert_eq!(Open::from(300), Open::B);
        assert_eq!(Open::from(2), Open::Other(2));
        assert_eq!(Open::Other(2).to_string(), "other 2");
        assert_eq!(Open::A.to_string(), "a");
        assert_eq!(Open::from_u16(300), Open::B);
        assert_eq!(Open::Other(2).to_u16(), 2);
    }
}
