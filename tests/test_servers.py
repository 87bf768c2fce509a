"""The server fixtures give real, working servers: a round trip through each one."""

from __future__ import annotations

import uuid

import pytest

from tests.support.servers import MongoServer, PostgresServer, SeaweedS3


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# -- S3 (SeaweedFS) ---------------------------------------------------------------------------
def test_s3_boto3_put_get(s3_server: SeaweedS3) -> None:
    bucket = s3_server.make_bucket(unique("boto"))
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="dir/a.csv", Body=b"sku,qty\n1,2\n")
    assert client.get_object(Bucket=bucket, Key="dir/a.csv")["Body"].read() == b"sku,qty\n1,2\n"
    listed = client.list_objects_v2(Bucket=bucket, Prefix="dir/")
    assert [item["Key"] for item in listed["Contents"]] == ["dir/a.csv"]
    assert bucket in [item["Name"] for item in client.list_buckets()["Buckets"]]


def test_s3_rejects_other_keys(s3_server: SeaweedS3) -> None:
    import boto3
    from botocore.exceptions import ClientError

    bucket = s3_server.make_bucket(unique("auth"))
    stranger = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id="someone-else",
        aws_secret_access_key="wrong",
        region_name="us-east-1",
    )
    with pytest.raises(ClientError, match="InvalidAccessKeyId"):
        stranger.list_objects_v2(Bucket=bucket)


def test_s3fs_and_boto3_from_env_vars_only(s3_env: SeaweedS3) -> None:
    import boto3
    import fsspec
    import s3fs

    bucket = s3_env.make_bucket(unique("env"))
    # No endpoint, keys or region passed: all from AWS_* set by the fixture.
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    with fs.open(f"{bucket}/x/data.txt", "wb") as handle:
        handle.write(b"through s3fs")
    assert fs.cat(f"{bucket}/x/data.txt") == b"through s3fs"
    assert fs.ls(f"{bucket}/x") == [f"{bucket}/x/data.txt"]
    # The way the product opens URLs.
    with fsspec.open(f"s3://{bucket}/x/data.txt", "rb") as handle:
        assert handle.read() == b"through s3fs"
    client = boto3.client("s3")
    assert client.meta.endpoint_url == s3_env.endpoint_url
    assert client.get_object(Bucket=bucket, Key="x/data.txt")["Body"].read() == b"through s3fs"


def test_s3_stop_then_restart_keeps_data(s3_server: SeaweedS3) -> None:
    from botocore.exceptions import EndpointConnectionError

    bucket = s3_server.make_bucket(unique("restart"))
    s3_server.client().put_object(Bucket=bucket, Key="kept.txt", Body=b"survives SIGKILL")
    port, pid = s3_server.port, s3_server.pid
    fast_fail = s3_server.client(connect_timeout=1, retries={"max_attempts": 1})
    s3_server.stop()
    try:
        with pytest.raises(EndpointConnectionError):
            fast_fail.list_objects_v2(Bucket=bucket)
    finally:
        s3_server.restart()  # the session's server stays usable whatever happened above
    assert s3_server.port == port and s3_server.pid != pid
    body = s3_server.client().get_object(Bucket=bucket, Key="kept.txt")["Body"].read()
    assert body == b"survives SIGKILL"


# -- PostgreSQL -------------------------------------------------------------------------------
def test_postgres_transaction_and_rollback(postgres_server: PostgresServer) -> None:
    import sqlalchemy as sa

    table = unique("orders").replace("-", "_")
    engine = sa.create_engine(postgres_server.url)
    try:
        with engine.begin() as conn:
            assert conn.execute(sa.text("select current_database()")).scalar() == "backorder"
            conn.execute(sa.text(f"create table {table} (sku text primary key, qty int not null)"))
            conn.execute(
                sa.text(f"insert into {table} values (:sku, :qty)"),
                [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 2}],
            )
        with engine.connect() as conn:
            trans = conn.begin()
            conn.execute(sa.text(f"insert into {table} values ('c', 3)"))
            conn.execute(sa.text(f"update {table} set qty = 10 where sku = 'a'"))
            conn.execute(sa.text(f"create table {table}_ddl (x int)"))  # DDL is transactional
            assert conn.execute(sa.text(f"select sum(qty) from {table}")).scalar() == 15
            trans.rollback()
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f"select sku, qty from {table} order by sku")).all()
            assert [tuple(row) for row in rows] == [("a", 1), ("b", 2)]
            exists = conn.execute(sa.text("select to_regclass(:name)"), {"name": f"{table}_ddl"})
            assert exists.scalar() is None
            conn.execute(sa.text(f"drop table {table}"))
            conn.commit()
    finally:
        engine.dispose()


# -- MongoDB wire protocol (nx-27017) ---------------------------------------------------------
def test_mongo_crud_and_unique_index(mongo_server: MongoServer) -> None:
    from pymongo.errors import DuplicateKeyError

    client = mongo_server.client(serverSelectionTimeoutMS=5000)
    try:
        assert client.admin.command("ping")["ok"] == 1
        # nx-27017 accepts only [A-Za-z0-9_] in collection names (MongoDB also allows "-").
        coll = client.get_default_database()[unique("skus").replace("-", "_")]
        coll.create_index("sku", unique=True)
        coll.insert_many([{"sku": f"s{i}", "qty": i} for i in range(5)])
        found = list(coll.find({"qty": {"$gte": 2}}, {"_id": 0}).sort("qty", -1))
        assert found == [{"sku": "s4", "qty": 4}, {"sku": "s3", "qty": 3}, {"sku": "s2", "qty": 2}]
        with pytest.raises(DuplicateKeyError):
            coll.insert_one({"sku": "s1", "qty": 99})
        assert coll.delete_many({"qty": {"$lt": 3}}).deleted_count == 3
        assert coll.count_documents({}) == 2
        coll.drop()
    finally:
        client.close()
