"""Create the stack's S3 buckets if they are missing (the compose service s3-buckets).

Buckets come from S3_BUCKETS (comma-separated); endpoint and keys from the standard AWS
variables. Safe to re-run: existing buckets are left alone.
"""

import os
import sys

import boto3
from botocore.exceptions import BotoCoreError, ClientError


def main() -> int:
    wanted = [name.strip() for name in os.environ.get("S3_BUCKETS", "").split(",") if name.strip()]
    if not wanted:
        print("create_buckets: S3_BUCKETS is empty; nothing to do", file=sys.stderr)
        return 2
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
    try:
        s3 = boto3.client("s3")
        existing = {bucket["Name"] for bucket in s3.list_buckets().get("Buckets", [])}
        for name in wanted:
            if name in existing:
                print(f"create_buckets: s3://{name} exists")
            else:
                s3.create_bucket(Bucket=name)
                print(f"create_buckets: created s3://{name}")
    except (BotoCoreError, ClientError) as exc:
        print(f"create_buckets: {endpoint}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
