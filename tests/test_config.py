from pathlib import Path

import pytest

from mllm_index.configs.schema import ConfigError, IndexJobConfig, RerankJobConfig, load_config

CONFIGS = Path(__file__).parents[1] / "configs"


def test_example_config_is_valid():
    cfg = load_config(IndexJobConfig, str(CONFIGS / "gallery.yaml")).require()
    assert cfg.model.name == "facebook/dinov2-small" and cfg.index.metric == "ip"


def test_rerank_example_config_is_valid():
    cfg = load_config(RerankJobConfig, str(CONFIGS / "rerank.yaml"), {"search.top_k": 50}).require()
    assert cfg.reranker.model == "Qwen/Qwen2.5-VL-3B-Instruct" and cfg.search.top_k == 50 and cfg.reranker.depth == 100
    with pytest.raises(ConfigError, match="output_uri"):
        load_config(RerankJobConfig, None, {"queries.uri": "q", "index_uri": "i"}).require()
    with pytest.raises(ConfigError, match="quote the words"):
        load_config(RerankJobConfig, None, None, ["reranker.yes_words=[yes]"])
    with pytest.raises(ConfigError, match="reranker.fusion_weight"):
        load_config(RerankJobConfig, None, None, ["reranker.fusion_weight=2"])


def test_precedence_file_then_shortcuts_then_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("source: {uri: s3://a/}\nindex: {uri: s3://a/idx}\nmodel: {name: m1}\nembed: {batch_size: 8}\n")
    cfg = load_config(IndexJobConfig, str(path), {"model.name": "m2", "source.uri": None},
                      ["embed.batch_size=128", "storage.allowed_roots=[s3://a/]", "model.image_size=null"])
    assert cfg.model.name == "m2" and cfg.source.uri == "s3://a/"
    assert cfg.embed.batch_size == 128 and cfg.storage.allowed_roots == ["s3://a/"]


def test_common_case_needs_no_file():
    cfg = load_config(IndexJobConfig, None, {"source.uri": "g", "index.uri": "i", "model.name": "m"}).require()
    assert cfg.run.part_size == 4096


@pytest.mark.parametrize("override, expected", [
    (["model.pooling=max"], ["model.pooling", "'auto'", "'cls'", "'mean'", "'gem'"]),
    (["index.metric=cosine"], ["index.metric", "'ip'", "'l2'"]),
    (["embed.batchsize=3"], ["embed.batchsize", "unknown setting", "batch_size", "concurrency"]),
    (["nonsense.x=1"], ["nonsense", "unknown setting", "decode", "embed", "index"]),
    (["decode.batch_size=0"], ["decode.batch_size", "greater than 0"]),
    (["source.format=zip"], ["source.format", "'webdataset'", "'parquet'"]),
])
def test_errors_name_the_field_and_the_allowed_values(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(IndexJobConfig, None, None, override)
    for text in expected:
        assert text in str(info.value)


def test_missing_required_settings_are_named():
    with pytest.raises(ConfigError, match="source.uri, index.uri, model.name"):
        load_config(IndexJobConfig).require()


@pytest.mark.parametrize("options", [{"key": "AKIA..."}, {"secret": "x"}, {"client_kwargs": {"aws_secret_access_key": "x"}}, {"token": "t"}])
def test_credentials_are_refused_in_configs(options):
    with pytest.raises(ConfigError) as info:
        load_config(IndexJobConfig, None, {"storage.options": options})
    assert "credentials are not accepted" in str(info.value) and "AWS_SECRET_ACCESS_KEY" in str(info.value)
    assert "AKIA" not in str(info.value)


def test_non_credential_storage_options_pass():
    cfg = load_config(IndexJobConfig, None, None, ["storage.options={endpoint_url: 'http://127.0.0.1:9000'}"])
    assert cfg.storage.options == {"endpoint_url": "http://127.0.0.1:9000"}


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(IndexJobConfig, str(tmp_path / "nope.yaml"))
    (tmp_path / "bad.yaml").write_text("source: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(IndexJobConfig, str(tmp_path / "bad.yaml"))
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(IndexJobConfig, None, None, ["novalue"])
