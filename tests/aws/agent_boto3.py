"""The agent: boto3 with whatever credentials its environment holds (the broker's
placeholders under `broker run`). Creates a bucket, puts and gets a small and a 6 MiB object,
and asks STS who it is.

usage: agent_boto3.py BUCKET
"""
import hashlib
import os
import random
import sys

import boto3

bucket = sys.argv[1]
print("id=" + os.environ.get("AWS_ACCESS_KEY_ID", ""))
print("secret=" + os.environ.get("AWS_SECRET_ACCESS_KEY", ""))
print("environ=" + open("/proc/self/environ", "rb").read().decode(errors="replace").replace("\0", " "))
sys.stdout.flush()

region = os.environ["AWS_DEFAULT_REGION"]
s3 = boto3.client("s3")
s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})
s3.put_object(Bucket=bucket, Key="small.txt", Body=b"hello from the agent")
big = random.Random(22).randbytes(6 * 1024 * 1024)
s3.put_object(Bucket=bucket, Key="big.bin", Body=big)
small = s3.get_object(Bucket=bucket, Key="small.txt")["Body"].read()
got = s3.get_object(Bucket=bucket, Key="big.bin")["Body"].read()
print("small=" + small.decode())
print("big-sha256-match=%s" % (hashlib.sha256(got).hexdigest() == hashlib.sha256(big).hexdigest()))
print("listed=" + ",".join(sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])))
print("arn=" + boto3.client("sts").get_caller_identity()["Arn"])
