"""Print a presigned GET URL for s3://BUCKET/KEY, made by boto3 (SigV4, the region's
endpoint) from the environment's credentials, or from ACCESS_KEY_ID and SECRET when given (an
agent smuggling a real key). botocore still presigns S3 with Signature Version 2 unless told
otherwise, which the broker refuses.

usage: presign.py BUCKET KEY [ACCESS_KEY_ID SECRET]
"""
import sys

import boto3
from botocore.config import Config

kwargs = {}
if len(sys.argv) > 3:
    kwargs = {"aws_access_key_id": sys.argv[3], "aws_secret_access_key": sys.argv[4]}
s3 = boto3.client("s3", config=Config(signature_version="s3v4"), **kwargs)
print(s3.generate_presigned_url("get_object", Params={"Bucket": sys.argv[1], "Key": sys.argv[2]}, ExpiresIn=600))
