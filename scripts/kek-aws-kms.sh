#!/bin/sh
# A key-encryption key in AWS KMS for blockrep's encryption at rest:
#
#   blockrep key rotate --kek --key-dir KEYS --kek-file OLD \
#       --new-kek-cmd '/usr/local/bin/kek-aws-kms.sh arn:aws:kms:eu-west-1:111122223333:key/KEY-ID'
#
# The contract (docs/security.md): blockrep sets BLOCKREP_KEK_OP to id, wrap
# or unwrap, and BLOCKREP_KEK_CONTEXT to what the key belongs to, which goes
# to KMS as the encryption context, so a wrapped key only unwraps for the
# source and serial it was made for. The plain key crosses only pipes.
# Needs the AWS CLI v2 with credentials allowed kms:Encrypt and kms:Decrypt
# on the key, and coreutils (basenc, od).
set -eu
key_id=${1:?usage: kek-aws-kms.sh KMS-KEY-ID-OR-ARN}
context="{\"blockrep\":\"${BLOCKREP_KEK_CONTEXT:-}\"}"
case "${BLOCKREP_KEK_OP:?BLOCKREP_KEK_OP is not set: this is run by blockrep}" in
id)
    echo "$key_id"
    ;;
wrap)
    read -r hex
    printf '%s' "$hex" | tr 'a-f' 'A-F' | basenc --base16 -d |
        aws kms encrypt --key-id "$key_id" --plaintext fileb:///dev/stdin \
            --encryption-context "$context" --query CiphertextBlob --output text
    ;;
unwrap)
    read -r wrapped
    # Not one pipeline: sh gives a pipeline the status of its last command,
    # and a refused decrypt must fail the unwrap, not print nothing.
    plain=$(printf '%s' "$wrapped" | base64 -d |
        aws kms decrypt --key-id "$key_id" --ciphertext-blob fileb:///dev/stdin \
            --encryption-context "$context" --query Plaintext --output text)
    printf '%s' "$plain" | base64 -d | od -An -v -tx1 | tr -d ' \n'
    echo
    ;;
*)
    echo "kek-aws-kms.sh: unknown operation $BLOCKREP_KEK_OP" >&2
    exit 2
    ;;
esac
