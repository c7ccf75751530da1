"""Upload an object with STREAMING-AWS4-HMAC-SHA256-PAYLOAD (aws-chunked, every chunk signed on
a chain seeded by the request's signature), as the Java, Go and Rust SDKs do; botocore and the
aws CLI do not sign chunks, so this client does: the request signature with botocore's signer,
each chunk's with the same key. Then reads the object back with boto3.

With `trailer` as a fourth argument it sends STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER
instead, as the SDKs that add checksums do: after the final chunk a CRC32 trailing header,
signed on the same chain (`x-amz-trailer-signature`).

usage: streaming_put.py BUCKET KEY SIZE [trailer]   (prints streaming-roundtrip-ok)
"""
import base64
import datetime
import hashlib
import os
import random
import sys
import zlib

import boto3
import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

bucket, key, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
trailer = sys.argv[4:] == ["trailer"]
region = os.environ["AWS_DEFAULT_REGION"]
print("id=" + os.environ["AWS_ACCESS_KEY_ID"])
s3 = boto3.client("s3")
try:
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})
except s3.exceptions.BucketAlreadyOwnedByYou:
    pass

data = random.Random(7).randbytes(size)
chunk_size = 64 * 1024
chunks = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)] + [b""]
frame_len = sum(len("%x;chunk-signature=" % len(c)) + 64 + 2 + len(c) + 2 for c in chunks)
checksum = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
trailer_line = "x-amz-checksum-crc32:%s" % checksum
if trailer:
    # The final chunk's header is followed by the trailing headers, not by an empty data line.
    frame_len += -2 + len(trailer_line) + 2 + len("x-amz-trailer-signature:") + 64 + 2 + 2

host = "%s.s3.%s.amazonaws.com" % (bucket, region)
amz_date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
headers = {
    "Host": host,
    "X-Amz-Date": amz_date,
    "X-Amz-Content-SHA256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD" + ("-TRAILER" if trailer else ""),
    "Content-Encoding": "aws-chunked",
    "X-Amz-Decoded-Content-Length": str(size),
    "Content-Length": str(frame_len),
}
if trailer:
    headers["X-Amz-Trailer"] = "x-amz-checksum-crc32"
credentials = Credentials(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])
auth = S3SigV4Auth(credentials, "s3", region)
request = AWSRequest(method="PUT", url="https://%s/%s" % (host, key), headers=headers)
request.context["timestamp"] = amz_date
seed = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
scope = "%s/%s/s3/aws4_request" % (amz_date[:8], region)
authorization = "AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
    credentials.access_key, scope, auth.signed_headers(auth.headers_to_sign(request)), seed)

empty = hashlib.sha256(b"").hexdigest()
body = bytearray()
previous = seed
for chunk in chunks:
    to_sign = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", amz_date, scope, previous, empty,
                         hashlib.sha256(chunk).hexdigest()])
    previous = auth.signature(to_sign, request)
    body += b"%x;chunk-signature=%s\r\n" % (len(chunk), previous.encode())
    if chunk or not trailer:
        body += chunk + b"\r\n"
if trailer:
    to_sign = "\n".join(["AWS4-HMAC-SHA256-TRAILER", amz_date, scope, previous,
                         hashlib.sha256((trailer_line + "\n").encode()).hexdigest()])
    signature = auth.signature(to_sign, request)
    body += ("%s\r\nx-amz-trailer-signature:%s\r\n\r\n" % (trailer_line, signature)).encode()
assert len(body) == frame_len

send = dict(headers, Authorization=authorization)
del send["Host"]
answer = urllib3.PoolManager().request("PUT", "https://%s/%s" % (host, key), body=bytes(body), headers=send)
print("put-status=%d" % answer.status)
if answer.status != 200:
    print(answer.data.decode(errors="replace"))
got = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
if hashlib.sha256(got).digest() == hashlib.sha256(data).digest():
    print("streaming-roundtrip-ok")
