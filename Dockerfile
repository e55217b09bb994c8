# Test image: the project's pytest suite inside the AWS Glue 5.0 runtime
# (Amazon Linux 2023, Python 3.11, Spark 3.5.4 and Glue's ETL library), so
# the tests marked `glue` run against the real GlueContext.
#
# AWS documents the tag public.ecr.aws/glue/aws-glue-libs:5 for Glue 5.0,
# which moves with every image release. 5.0.10 is a release tag of the same
# repository that public projects pull.
# NOTE: neither this tag nor an image digest could be checked against the
# registry where this file was written. After the first pull, pin the digest
# that `docker inspect --format '{{index .RepoDigests 0}}' <image>` prints.
FROM public.ecr.aws/glue/aws-glue-libs:5.0.10

# hadoop is the image's default user in Glue 5.0 (glue_user in Glue 4.0).
USER hadoop
WORKDIR /home/hadoop/workspace
ENV PATH=/home/hadoop/.local/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1

# The product targets Python 3.11, the Glue 5.0 runtime's version.
RUN python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), f"python3 is {sys.version}, expected 3.11"'

# Test dependencies for the hadoop user only. The file leaves out pyspark and
# AWSGlueDataplanePython, so Glue's own Spark, PySpark and awsglue stay in use.
COPY --chown=hadoop:hadoop requirements/glue-image.txt /home/hadoop/glue-image.txt
RUN python3 -m pip install --user --no-cache-dir -r /home/hadoop/glue-image.txt

# MiniStack, the local AWS endpoint that the endpoint tests start, gets a
# virtual environment of its own at .venv-ministack, the path `make setup`
# uses, so its pinned boto3 and botocore cannot replace the test dependencies.
# MiniStack runs Lambda handlers with this environment's interpreter, which
# is why boto3 is installed there too.
# NOTE: not built here; this assumes the image's python3 ships the venv and
# ensurepip modules.
RUN python3 -m venv /home/hadoop/workspace/.venv-ministack \
 && /home/hadoop/workspace/.venv-ministack/bin/python -m pip install --no-cache-dir \
        ministack==1.5.33 boto3==1.43.106

# The project itself; .dockerignore keeps local environments, build output
# and credentials out. The editable install keeps taxi_pipeline importable
# from lib/, where the packaging code expects the repository around it.
COPY --chown=hadoop:hadoop . /home/hadoop/workspace
RUN python3 -m pip install --user --no-cache-dir --no-deps -e .

# The image's entrypoint runs its arguments through a shell: AWS documents
# `docker run ... public.ecr.aws/glue/aws-glue-libs:5 -c "python3 -m pytest"`.
# So the default command is the same arguments, and the whole suite runs,
# the glue tests included. Override it with -c "<command>".
CMD ["-c", "python3 -m pytest"]
