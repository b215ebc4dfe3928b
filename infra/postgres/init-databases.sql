-- Run once by the postgres image on an empty volume (docker-entrypoint-initdb.d): one database per server.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
